"""`zimage serve` flags -> ServerSettings (the subcommand is registered by zimage.cli.main)."""

import argparse
from pathlib import Path

import pytest

from zimage.cli import serve
from zimage.errors import UsageError


def parse(*argv):
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_defaults_are_safe(monkeypatch, tmp_path):
    monkeypatch.delenv("ZIMAGE_API_KEY", raising=False)
    monkeypatch.setenv("ZIMAGE_DATA_DIR", str(tmp_path / "d"))
    s = serve.settings_from_args(parse())
    assert s.host == "127.0.0.1" and s.api_key is None and s.cors_origins == ()
    assert s.data_dir == tmp_path / "d" and s.warmup_size == (1024, 1024)
    assert parse().func is serve.run


def test_flags_and_env_key(tmp_path):
    args = parse("--host", "0.0.0.0", "--port", "9000", "--data-dir", str(tmp_path), "--max-queue", "5",
                 "--max-batch", "2", "--warmup-size", "none", "--default-size", "512x768", "--model", "tiny-random",
                 "--cors-origin", "https://a.example", "--cors-origin", "https://b.example", "--no-previews")
    s = serve.settings_from_args(args, environ={"ZIMAGE_API_KEY": "from-env"})
    assert (s.host, s.port, s.data_dir, s.max_queue, s.max_batch) == ("0.0.0.0", 9000, Path(tmp_path), 5, 2)
    assert s.warmup_size is None and s.default_size == (512, 768) and s.engine.model == "tiny-random"
    assert s.api_key == "from-env" and s.cors_origins == ("https://a.example", "https://b.example")
    assert not s.previews
    assert s.url_ttl_s == 3600 and s.url_secret is None
    s = serve.settings_from_args(parse("--url-ttl", "60"), environ={"ZIMAGE_URL_SECRET": "e" * 32})
    assert s.url_ttl_s == 60 and s.url_secret == "e" * 32
    assert serve.settings_from_args(parse("--api-key", "flag"), environ={"ZIMAGE_API_KEY": "env"}).api_key == "flag"
    assert s.max_upload_bytes == 51 * 2**20  # the default: two 25 MiB files and their fields
    assert serve.settings_from_args(parse("--max-upload-mb", "8"), environ={}).max_upload_bytes == 8 * 2**20


@pytest.mark.parametrize("argv,param", [(("--default-size", "100x100"), "default-size"),
                                        (("--max-batch", "0"), "max-batch"), (("--port", "70000"), "port"),
                                        (("--url-ttl", "-1"), "url-ttl"), (("--url-secret", "short"), "url-secret"),
                                        (("--max-upload-mb", "0.5"), "max-upload-mb"),
                                        (("--max-upload-mb", "4096"), "max-upload-mb")])
def test_bad_flags_are_usage_errors(argv, param):
    with pytest.raises(UsageError) as e:
        serve.settings_from_args(parse(*argv), environ={})
    assert e.value.param == param
    assert "nearest" not in str(e.value)  # 100x100 is out of range: no "nearest: 96 or 112" (both out of range)


def test_engine_flags_become_one_engine_config_the_loader_uses(monkeypatch, tmp_path):
    """`serve` maps the model flags through the same function as `generate` (cli.common.engine_config) into one
    EngineConfig held by the settings, and the server's default loader loads exactly that config."""
    from zimage.cli.common import engine_config
    from zimage.engine.config import EngineConfig
    from zimage.engine.engine import Engine
    from zimage.server.app import default_loader

    args = parse("--model", "tiny-random", "--device", "cpu", "--dtype", "fp32", "--speed", "eager",
                 "--vram-budget", "6.5", "--fp8", "--converted-cache")
    s = serve.settings_from_args(args, environ={})
    assert isinstance(s.engine, EngineConfig)
    assert s.engine == engine_config(args, show_progress=False)
    assert (s.engine.model, s.engine.device, s.engine.dtype, s.engine.speed, s.engine.vram_budget_gib,
            s.engine.fp8, s.engine.converted_cache) == ("tiny-random", "cpu", "fp32", "eager", 6.5, True, True)
    assert s.engine.expected_images is None and not s.engine.show_progress  # a server makes many images, no bars
    loaded = []
    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, config: loaded.append(config) or "engine"))
    assert default_loader(s)() == "engine" and loaded == [s.engine]


def test_store_retention_and_ray_flags_reach_the_settings(tmp_path):
    from zimage.cli.main import build_parser
    from zimage.cli.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--database-url", "postgresql://u@h/db",
                                      "--images-url", str(tmp_path / "img"), "--retention", "7d,1GB", "--ray",
                                      "--autoscale", "1:3"])
    s = settings_from_args(args, environ={})
    assert s.database_url == "postgresql://u@h/db" and s.images_url == str(tmp_path / "img")
    assert (s.retention_age_s, s.retention_bytes) == (7 * 86400, 10**9)
    assert args.ray and args.autoscale == "1:3"
    env = settings_from_args(build_parser().parse_args(["serve", "--data-dir", str(tmp_path)]),
                             environ={"ZIMAGE_DATABASE_URL": "postgresql://x@y/z"})
    assert env.database_url == "postgresql://x@y/z"


def test_a_bad_retention_is_a_usage_error(tmp_path):
    import pytest

    from zimage.cli.main import build_parser
    from zimage.cli.serve import settings_from_args
    from zimage.errors import UsageError

    with pytest.raises(UsageError, match="--retention"):
        settings_from_args(build_parser().parse_args(["serve", "--retention", "forever"]), environ={})
