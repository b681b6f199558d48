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
    assert s.warmup_size is None and s.default_size == (512, 768) and s.model == "tiny-random"
    assert s.api_key == "from-env" and s.cors_origins == ("https://a.example", "https://b.example")
    assert not s.previews
    assert serve.settings_from_args(parse("--api-key", "flag"), environ={"ZIMAGE_API_KEY": "env"}).api_key == "flag"


@pytest.mark.parametrize("argv,param", [(("--default-size", "100x100"), "default-size"),
                                        (("--max-batch", "0"), "max-batch"), (("--port", "70000"), "port")])
def test_bad_flags_are_usage_errors(argv, param):
    with pytest.raises(UsageError) as e:
        serve.settings_from_args(parse(*argv), environ={})
    assert e.value.param == param
