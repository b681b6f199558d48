"""A damaged model folder is reported by name, with ModelFolderError, before any weights are read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from zimage.errors import ModelFolderError
from zimage.weights.check import check_model_folder


def shards(folder: Path, component: str) -> list[Path]:
    return sorted((folder / component).glob("*.safetensors"))


def check_fails(folder: Path) -> str:
    with pytest.raises(ModelFolderError) as info:
        check_model_folder(folder)
    return str(info.value)


def test_intact_folder_passes(tiny_folder):
    checked = check_model_folder(tiny_folder)
    assert set(checked) == {"transformer", "text_encoder", "vae"}
    assert all(c.nbytes > 0 and c.tensors for c in checked.values())
    # the text encoder's last layer and final norm are skipped on purpose (hidden_states[-2])
    te = checked["text_encoder"].tensors
    assert "norm.weight" not in te and not any(k.startswith("layers.2.") for k in te)
    # the VAE encoder is skipped (text-to-image only decodes)
    assert not any(k.startswith("encoder.") for k in checked["vae"].tensors)


def test_missing_component(model_copy):
    shutil.rmtree(model_copy / "vae")
    msg = check_fails(model_copy)
    assert "vae/config.json" in msg and str(model_copy) in msg and "missing" in msg


def test_missing_weights_file(model_copy):
    (model_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    msg = check_fails(model_copy)
    assert str(model_copy / "vae") in msg and "has no weights" in msg


def test_missing_shard_listed_in_index(model_copy):
    victim = shards(model_copy, "transformer")[1]
    victim.unlink()
    msg = check_fails(model_copy)
    assert str(victim) in msg and "missing" in msg


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_shard(model_copy, keep):
    victim = shards(model_copy, "transformer")[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep)])
    msg = check_fails(model_copy)
    assert str(victim) in msg and "truncated" in msg


def test_truncated_inside_header(model_copy):
    victim = shards(model_copy, "text_encoder")[0]
    victim.write_bytes(victim.read_bytes()[:100])
    msg = check_fails(model_copy)
    assert str(victim) in msg and "truncated" in msg


def test_empty_file(model_copy):
    victim = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    victim.write_bytes(b"")
    msg = check_fails(model_copy)
    assert str(victim) in msg and "truncated" in msg and "0 bytes" in msg


def test_shape_does_not_match_config(model_copy):
    cfg_path = model_copy / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cap_feat_dim"] = 48  # the checkpoint (and the text encoder) have 32
    cfg_path.write_text(json.dumps(cfg))
    msg = check_fails(model_copy)
    assert "transformer/config.json implies" in msg and "has shape" in msg and "cap_embedder" in msg
    assert "32" in msg and "48" in msg
    assert ".safetensors" in msg  # the file that holds the tensor


def test_config_the_network_rejects(model_copy):
    """dim 96 with 2 heads gives head_dim 48 != sum(axes_dims) 32: diffusers asserts; we report the config."""
    cfg_path = model_copy / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dim"] = 96
    cfg_path.write_text(json.dumps(cfg))
    msg = check_fails(model_copy)
    assert str(cfg_path) in msg and "does not describe a valid transformer" in msg


def test_text_encoder_shape_does_not_match_config(model_copy):
    cfg_path = model_copy / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 48  # checkpoint: 64
    cfg_path.write_text(json.dumps(cfg))
    msg = check_fails(model_copy)
    assert "text_encoder/config.json implies" in msg and "mlp" in msg and "48" in msg


def test_config_not_json(model_copy):
    (model_copy / "vae" / "config.json").write_text("{not json")
    msg = check_fails(model_copy)
    assert str(model_copy / "vae" / "config.json") in msg and "not valid JSON" in msg


@pytest.mark.parametrize("remove", [["tokenizer.json"], None])
def test_missing_tokenizer(model_copy, remove):
    if remove is None:
        shutil.rmtree(model_copy / "tokenizer")
    else:
        for name in remove:
            (model_copy / "tokenizer" / name).unlink()
    msg = check_fails(model_copy)
    assert "missing the tokenizer" in msg and "tokenizer/tokenizer.json" in msg and str(model_copy) in msg


def test_missing_scheduler(model_copy):
    shutil.rmtree(model_copy / "scheduler")
    assert "scheduler/scheduler_config.json" in check_fails(model_copy)


def test_not_a_model_folder(tmp_path):
    msg = check_fails(tmp_path)
    assert str(tmp_path) in msg and "model_index.json is missing" in msg


def _rewrite_without(path: Path, drop: str | None = None, add: dict | None = None) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    if drop is not None:
        del tensors[drop]
    tensors.update(add or {})
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor(model_copy):
    from safetensors import safe_open

    victim = shards(model_copy, "transformer")[0]
    with safe_open(str(victim), "pt") as f:
        key = sorted(f.keys())[0]
    _rewrite_without(victim, drop=key)
    msg = check_fails(model_copy)
    assert "lacks 1 tensors" in msg and key in msg and str(model_copy / "transformer") in msg


def test_unexpected_tensor(model_copy):
    import torch

    victim = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    _rewrite_without(victim, add={"decoder.extra_layer.weight": torch.zeros(2)})
    msg = check_fails(model_copy)
    assert "does not know" in msg and "decoder.extra_layer.weight" in msg


def test_engine_load_reports_before_reading_weights(model_copy, monkeypatch):
    """Engine.load fails on a damaged folder without loading any network."""
    import zimage.weights.load as load
    from zimage.engine.engine import Engine

    loaded = []
    monkeypatch.setattr(load, "load_network", lambda *a, **k: loaded.append(a))
    victim = shards(model_copy, "text_encoder")[-1]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(ModelFolderError, match="truncated"):
        Engine.load(model=str(model_copy), device="cpu", dtype="fp32")
    assert loaded == []
