"""The application builder's arguments (serve run ... key=value) and the shape of what it builds."""

import pytest

pytest.importorskip("ray.serve")

from zimage.deploy.config import EngineDeployment, parse_autoscale  # noqa: E402
from zimage.deploy.ray_app import app, parse_args  # noqa: E402
from zimage.errors import UsageError  # noqa: E402


def test_arguments_become_settings_engine_and_deployment(tmp_path):
    settings, engine, d = parse_args({"model": "tiny-random", "device": "cpu", "replicas": 3, "max_batch": "4",
                                      "data_dir": str(tmp_path), "retention": "7d,1GB", "warmup_size": "none",
                                      "database_url": "postgresql://u@h/db", "fp8": "true"}, environ={})
    assert (engine.model, engine.device, engine.fp8) == ("tiny-random", "cpu", True)
    assert settings.engine.model == "tiny-random" and settings.warmup_size is None and settings.data_dir == tmp_path
    assert (settings.retention_age_s, settings.retention_bytes) == (7 * 86400, 10**9)
    assert d.replicas == 3 and d.max_batch == 4 and d.ongoing == 8 and d.capacity == 24
    auto = parse_args({"autoscale": "1:5", "max_ongoing_requests": "3"}, environ={"ZIMAGE_API_KEY": "k"})
    assert auto[2].autoscale == (1, 5) and auto[2].capacity == 15 and auto[0].api_key == "k"


def test_lora_arguments_configure_the_replicas_engine(tmp_path):
    _, engine, _ = parse_args({"lora_dir": str(tmp_path), "lora_slots": "2", "lora_rank": "32",
                               "lora": "style:0.8,detail"}, environ={})
    assert (engine.lora_dir, engine.lora_names_only, engine.lora_slots, engine.lora_rank) == (str(tmp_path), True, 2, 32)
    assert [(spec.name, spec.scale) for spec in engine.loras] == [("style", 0.8), ("detail", 1.0)]
    with pytest.raises(UsageError) as err:
        parse_args({"lora_slots": "2"}, environ={})  # per-request LoRAs are named from a folder
    assert err.value.param == "lora-slots"
    with pytest.raises(UsageError, match="no such folder"):
        parse_args({"lora_dir": str(tmp_path / "absent")}, environ={})


@pytest.mark.parametrize("args, param", [
    ({"replica": 2}, "replica"), ({"replicas": "two"}, "replicas"), ({"replicas": 0}, "replicas"),
    ({"autoscale": "4:1"}, "autoscale"), ({"autoscale": "x"}, "autoscale"), ({"fp8": "maybe"}, "fp8"),
    ({"retention": "soon"}, "retention"), ({"warmup_size": "100x100"}, "warmup_size"),
])
def test_bad_arguments_are_usage_errors_naming_them(args, param):
    with pytest.raises(UsageError) as err:
        parse_args(args, environ={})
    assert err.value.param == param


def test_the_builder_returns_an_application_for_serve():
    from ray.serve import Application

    assert isinstance(app({"model": "tiny-random", "device": "cpu", "replicas": 2}), Application)


def test_engine_deployment_rules():
    assert parse_autoscale("0:3") == (0, 3)
    assert EngineDeployment(autoscale=(0, 3)).max_replicas == 3
    with pytest.raises(UsageError):
        EngineDeployment(autoscale=(0, 0))
