"""Defaults follow the model: Z-Image-Turbo's 8 forwards without guidance, the non-distilled Z-Image's 50 with
guidance 4, recognised by repo id or scheduler shift, and --recipe overrides."""

from __future__ import annotations

import json

import pytest

from zimage.errors import UsageError
from zimage.recipe import BASE, TURBO, detect_recipe, recipe_named


@pytest.mark.parametrize("model_id, shift, want", [
    ("Tongyi-MAI/Z-Image-Turbo", 3.0, TURBO), ("Tongyi-MAI/Z-Image", 6.0, BASE), ("Tongyi-MAI/Z-Image", 3.0, BASE),
    ("my-finetune", 6.0, BASE), ("my-finetune", 3.0, TURBO), ("tiny-random", 3.0, TURBO),
    ("someone/Z-Image-Turbo-fp8", 3.0, TURBO),
])
def test_detect_recipe(model_id, shift, want):
    assert detect_recipe(model_id, shift)[0] is want


def test_unknown_recipe_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown recipe 'fast'; choose one of auto, turbo, base"):
        recipe_named("fast")


@pytest.fixture
def base_folder(model_copy):
    """The tiny model with Z-Image's scheduler shift (6): what the non-distilled model's folder says."""
    path = model_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "shift": 6.0}))
    return model_copy


def test_a_base_folder_gets_the_base_defaults_and_turbo_can_be_forced(base_folder, capsys):
    from zimage.cli.main import main
    from zimage.engine.engine import Engine
    from zimage.request import GenerateRequest

    engine = Engine.load(model=str(base_folder), device="cpu", speed="eager")
    assert engine.recipe is BASE and engine.describe()["recipe"]["steps"] == 50
    result = engine.generate(GenerateRequest(prompts=("a fox",), width=256, height=256, steps=2, seed=1,
                                             negative_prompt="blurry"))
    assert result.request.guidance == 4.0 and result.request.cfg  # guidance from the recipe, steps as given
    assert result.images[0].metadata.recipe == "base"
    assert Engine.load(model=str(base_folder), device="cpu", speed="eager", recipe="turbo").recipe is TURBO
    assert main(["info", "--model", str(base_folder), "--device", "cpu"]) == 0
    assert "recipe: base (its scheduler's shift is 6, as Z-Image's): 50 steps, guidance 4" in capsys.readouterr().out
