"""Every bad input to the `zimage` CLI, as a table: the exit code (2 usage, 1 runtime), the message shape
(`zimage: error: ...` naming the value, no traceback), that nothing was written, and that usage errors are found
before the model loads.

Each case runs in-process through zimage.cli.main.main in a fresh folder; "{tmp}" in its arguments, files and
expected message stands for that folder. A few failures that need the file system to misbehave (a full disk) are
separate tests below the table, some in a real subprocess.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from zimage.cli.main import main

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ("--model", "tiny-random", "--device", "cpu", "--width", "256", "--height", "256", "--steps", "1")


@dataclass(frozen=True)
class Case:
    args: tuple  # argv after `zimage`
    code: int  # exit code
    expect: tuple  # pieces of the message
    files: dict = field(default_factory=dict)  # written first: relative path -> str (utf-8) or bytes
    loads: bool = False  # the model may load first (errors only loading can find)


def gen(*args) -> tuple:
    return ("generate", *args)


CASES = {
    # -------------------------------------------------------------------------------- text that is not UTF-8
    "prompt with non-UTF-8 bytes (surrogateescape)": Case(
        gen("-p", "\udcff\udcfe cat", *FAST, "-o", "{tmp}/x.png"), 2,
        ("prompt cannot be encoded as UTF-8: character 1 is '\\udcff'",)),
    "prompt with a lone surrogate inside": Case(
        gen("-p", "a cat\ud83d", *FAST, "-o", "{tmp}/x.png"), 2,
        ("prompt cannot be encoded as UTF-8: character 6 is '\\ud83d'",)),
    "negative prompt with non-UTF-8 bytes": Case(
        gen("-p", "a cat", "--negative-prompt", "blur\udcff", "--guidance", "2", *FAST, "-o", "{tmp}/x.png"), 2,
        ("negative prompt cannot be encoded as UTF-8: character 5 is '\\udcff'",)),
    "JSONL prompt with an escaped lone surrogate": Case(
        gen("--prompts-file", "{tmp}/p.jsonl", *FAST, "-o", "{tmp}/out/"), 2,
        ("{tmp}/p.jsonl:2: prompt cannot be encoded as UTF-8: character 3 is '\\udcff'",),
        files={"p.jsonl": '{"prompt": "ok"}\n{"prompt": "a \\udcff cat"}\n'}),
    "JSONL negative prompt with an escaped lone surrogate": Case(
        gen("--prompts-file", "{tmp}/p.jsonl", *FAST, "-o", "{tmp}/out/"), 2,
        ("{tmp}/p.jsonl:1: negative prompt cannot be encoded as UTF-8: character 1 is '\\udc80'",),
        files={"p.jsonl": '{"prompt": "ok", "negative_prompt": "\\udc80", "guidance": 1}\n'}),
    "prompts file with bytes that are not UTF-8": Case(
        gen("--prompts-file", "{tmp}/p.txt", *FAST, "-o", "{tmp}/out/"), 2,
        ("prompts file {tmp}/p.txt cannot be read", "can't decode byte 0xff"),
        files={"p.txt": b"a cat\n\xff\xfe dog\n"}),
    # -------------------------------------------------------------------------------- make-tiny
    "make-tiny onto a regular file": Case(
        ("make-tiny", "{tmp}/model"), 2, ("{tmp}/model is a file, not a folder",), files={"model": "precious"}),
    "make-tiny under a regular file": Case(
        ("make-tiny", "{tmp}/a-file/model"), 2, ("{tmp}/a-file/model cannot be created: Not a directory",),
        files={"a-file": "precious"}),
    "make-tiny into a non-empty folder": Case(
        ("make-tiny", "{tmp}/model"), 2, ("{tmp}/model exists and is not empty",), files={"model/keep": "precious"}),
}


def tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def count_loads(monkeypatch):
    """Counts Engine.load calls (still loading for real)."""
    from zimage.engine.engine import Engine

    calls = []
    real = Engine.load.__func__

    def load(cls, *a, **k):
        calls.append(a)
        return real(cls, *a, **k)

    monkeypatch.setattr(Engine, "load", classmethod(load))
    return calls


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input(case, tmp_path, capsys, count_loads):
    def fill(s: str) -> str:
        return s.replace("{tmp}", str(tmp_path))

    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = tree(tmp_path)
    rc = main([fill(str(a)) for a in case.args])
    err = capsys.readouterr().err
    assert rc == case.code, err
    assert err.startswith("zimage: error: "), err
    for piece in case.expect:
        assert fill(piece) in err, (fill(piece), err)
    assert "Traceback" not in err
    assert tree(tmp_path) == before  # nothing written, nothing changed
    if not case.loads:
        assert count_loads == []


# ------------------------------------------------------------------------------------------------ not in the table
def run_zimage(*args, cwd: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    """A real `python -m zimage` process; `file_size_limit` (bytes) makes every larger write fail with EFBIG, as
    a full disk fails with ENOSPC: the same OSError path through the same code, from the real file system."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal that kills by default
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "zimage", *args], cwd=cwd, env=env, capture_output=True,
                          timeout=180, preexec_fn=limit if file_size_limit else None)


def test_non_utf8_argv_bytes_are_a_usage_error(tmp_path):
    """The issue's own example, `-p $'\\xff\\xfe cat'`: raw argv bytes, decoded by Python with surrogateescape."""
    p = run_zimage("generate", "-p", b"\xff\xfe cat", *FAST, "-o", "x.png", cwd=tmp_path)
    err = p.stderr.decode()
    assert p.returncode == 2, err
    assert err.strip() == ("zimage: error: prompt cannot be encoded as UTF-8: character 1 is '\\udcff', a lone "
                           "surrogate (what bytes that are not UTF-8 become on a command line); give the text in UTF-8")
    assert list(tmp_path.iterdir()) == []


def test_file_system_error_while_saving_the_png(tmp_path):
    """A write that the file system refuses (here: the file-size limit, as a full disk refuses with ENOSPC):
    exit 1, the path and the reason, and no file or temporary file left."""
    p = run_zimage("generate", "-p", "a cat", *FAST, "--seed", "1", "-o", "x.png", cwd=tmp_path,
                   file_size_limit=20_000)  # the 256x256 noise PNG is ~190 KB
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert err.splitlines()[-1] == "zimage: error: cannot write x.png: File too large; no file was written"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_disk_full_and_kin_while_saving(tmp_path, capsys, monkeypatch, code):
    """The errors a full disk, a quota, a read-only remount or a permission change give while PIL writes."""
    from PIL import Image

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Image.Image, "save", failing_save)
    rc = main(["generate", "-p", "a cat", *FAST, "--n", "2", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert err.splitlines()[-1] == (f"zimage: error: cannot write {tmp_path / 'x-1.png'}: {os.strerror(code)}; "
                                    "no file was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("limit, library", [(20_000, "tokenizers"), (300_000, "safetensors")])
def test_make_tiny_file_system_error_removes_what_it_wrote(tmp_path, limit, library):
    """make-tiny's writes go through tokenizers and safetensors (Rust, which raise their own exception types):
    a refused write is exit 1 with the folder and the reason, and the half-written folder is removed."""
    p = run_zimage("make-tiny", "new/model", cwd=tmp_path, file_size_limit=limit)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("zimage: error: cannot write the model folder new/model: ") and "File too large" in last
    assert last.endswith("; what was written is removed")
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_make_tiny_into_an_existing_empty_folder_that_fails_keeps_the_folder(tmp_path, capsys, monkeypatch):
    import zimage.weights.tiny as tiny

    def build(folder, **kw):
        (folder / "model_index.json").write_text("{")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tiny, "build_model_folder", build)
    (tmp_path / "empty").mkdir()
    rc = main(["make-tiny", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err == (f"zimage: error: cannot write the model folder {tmp_path / 'empty'}: No space left on device; "
                   "what was written is removed\n")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and list((tmp_path / "empty").iterdir()) == []


def test_make_tiny_into_a_read_only_folder(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root may write into a read-only folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(["make-tiny", str(ro / "model")])
        assert rc == 2 and f"{ro / 'model'} cannot be created: Permission denied" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)
