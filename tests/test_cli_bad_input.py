"""Every bad input to the `zimage` CLI, as a table: the exit code (2 usage, 1 runtime), the message shape
(`zimage: error: ...` naming the value, no traceback), that nothing was written, and that usage errors are found
before the model loads (or, for device and dtype, as Engine.load starts: before any weights are read).

Each case runs in-process through zimage.cli.main.main in a fresh folder; "{tmp}" in its arguments, files and
expected message stands for that folder. A few failures that need the file system to misbehave (a full disk) are
separate tests below the table, some in a real subprocess.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
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
    loads: bool = False  # Engine.load is entered (errors it finds: device, dtype first, then the weights)
    model_copy: bool = False  # {tmp}/model: a copy of the tiny model folder, then `damage` applied to it
    damage: object = None  # (model folder) -> None


def gen(*args) -> tuple:
    return ("generate", *args)


def png(record: dict | str | None = None, a1111: str | None = None) -> bytes:
    """An 8x8 PNG carrying a zimage record (a dict, or raw text for a damaged chunk) and/or A1111 parameters."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if record is not None:
        info.add_itxt("zimage", record if isinstance(record, str) else json.dumps(record))
    if a1111 is not None:
        info.add_text("parameters", a1111)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


RECORD = dict(prompt="a cat", negative_prompt="", seed=1, steps=1, guidance=0.0, width=256, height=256,
              model="tiny-random", model_revision=None, dtype="fp32")


def picture_png(size=(256, 256), mode="RGB", color=(120, 30, 200)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


PICTURE = picture_png()
MASK_WHITE, MASK_BLACK = picture_png(mode="L", color=255), picture_png(mode="L", color=0)
MASK_SMALL = picture_png((128, 128), mode="L", color=255)


def remove_vae(folder: Path) -> None:
    shutil.rmtree(folder / "vae")


def truncate_first_transformer_shard(folder: Path) -> None:
    victim = sorted((folder / "transformer").glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])


PF = ("--prompts-file", "{tmp}/p.jsonl", *FAST, "-o", "{tmp}/out/")  # a prompts file's cases: p.jsonl
OUT = ("-o", "{tmp}/x.png")
IMG = ("--model", "tiny-random", "--device", "cpu", "--steps", "1")  # image-input cases: the image sets the size

CASES = {
    # -------------------------------------------------------------------------------- prompts
    "empty prompt": Case(gen("-p", "", *FAST, *OUT), 2, ("prompt is empty",)),
    "blank prompt": Case(gen("-p", "   ", *FAST, *OUT), 2, ("prompt is empty",)),
    "prompt over 20,000 characters": Case(gen("-p", "x" * 20_001, *FAST, *OUT), 2,
                                          ("prompt has 20001 characters; the limit is 20000",)),
    "negative prompt over 20,000 characters": Case(gen("-p", "a", "--negative-prompt", "x" * 20_001, *FAST, *OUT), 2,
                                                   ("negative prompt is longer than 20000 characters",)),
    "prompt with non-UTF-8 bytes (surrogateescape)": Case(
        gen("-p", "\udcff\udcfe cat", *FAST, *OUT), 2, ("prompt cannot be encoded as UTF-8: character 1 is '\\udcff'",)),
    "prompt with a lone surrogate inside": Case(
        gen("-p", "a cat\ud83d", *FAST, *OUT), 2, ("prompt cannot be encoded as UTF-8: character 6 is '\\ud83d'",)),
    "negative prompt with non-UTF-8 bytes": Case(
        gen("-p", "a cat", "--negative-prompt", "blur\udcff", "--guidance", "2", *FAST, *OUT), 2,
        ("negative prompt cannot be encoded as UTF-8: character 5 is '\\udcff'",)),
    "two sources": Case(gen("-p", "a", "--prompts-file", "{tmp}/p.txt", *OUT), 2,
                        ("exactly one of --prompt, --prompts-file, --from-png",)),
    "no source": Case(gen(*OUT), 2, ("exactly one of --prompt, --prompts-file, --from-png",)),
    # -------------------------------------------------------------------------------- settings
    **{f"{flag} {value}": Case(gen("-p", "a cat", *FAST, flag, str(value), *OUT), 2, (expect,)) for flag, value, expect in [
        ("--width", 500, "width must be a multiple of 16, got 500"),
        ("--height", 1000, "height must be a multiple of 16, got 1000"),
        ("--width", 128, "width must be between 256 and 2048, got 128"),
        ("--height", 240, "height must be between 256 and 2048, got 240"),
        ("--width", 4096, "width must be between 256 and 2048, got 4096"),
        ("--height", 2064, "height must be between 256 and 2048, got 2064"),
        ("--vram-budget", -1, "--vram-budget must be a positive number of GiB, got -1.0"),  # as zimage plan says
        ("--vram-budget", 0, "--vram-budget must be a positive number of GiB, got 0.0"),
        ("--steps", 0, "steps must be between 1 and 100, got 0"),
        ("--steps", -3, "steps must be between 1 and 100, got -3"),
        ("--steps", 101, "steps must be between 1 and 100, got 101"),
        ("--guidance", -1, "guidance must be between 0 and 30.0, got -1.0"),
        ("--guidance", 31, "guidance must be between 0 and 30.0, got 31.0"),
        ("--guidance", "nan", "guidance must be a number, got nan"),
        ("--n", 0, "n must be between 1 and 16, got 0"),
        ("--n", 17, "n must be between 1 and 16, got 17"),
        ("--seed", -1, "seed must be between 0 and"),
    ]},
    "--aspect 5:4": Case(gen("-p", "a cat", "--model", "tiny-random", "--aspect", "5:4", *OUT), 2,
                         ("unknown aspect '5:4'; choose one of 1:1, 4:3",)),
    "--aspect with --width": Case(gen("-p", "a cat", "--aspect", "1:1", "--width", "512", *OUT), 2,
                                  ("give either --aspect or --width/--height, not both",)),
    "--dtype fp8": Case(gen("-p", "a cat", *FAST, "--dtype", "fp8", *OUT), 2, ("unknown dtype 'fp8'", "bf16", "fp32"),
                        loads=True),
    **{f"--device {d}": Case(gen("-p", "a cat", *FAST, "--device", d, *OUT), 2, (f"unknown device {d!r}", "cpu", "cuda"),
                             loads=True) for d in ("tpu", "cuda:x", "cpu:1", "gpu")},
    # -------------------------------------------------------------------------------- the model
    "model path that does not exist": Case(
        gen("-p", "a cat", *FAST, "--model", "{tmp}/nowhere/model", *OUT), 1,
        ("{tmp}/nowhere/model", "does not exist", "zimage download", "hf download Tongyi-MAI/Z-Image-Turbo"),
        loads=True),
    "model folder without its vae": Case(
        gen("-p", "a cat", *FAST, "--model", "{tmp}/model", *OUT), 1, ("{tmp}/model", "vae/config.json"),
        loads=True, model_copy=True, damage=remove_vae),
    "model folder with a truncated safetensors file": Case(
        gen("-p", "a cat", *FAST, "--model", "{tmp}/model", *OUT), 1,
        ("{tmp}/model/transformer/diffusion_pytorch_model-00001-of-", "truncated"),
        loads=True, model_copy=True, damage=truncate_first_transformer_shard),
    # -------------------------------------------------------------------------------- prompts files
    **{f"prompts file: {why}": Case(("generate", "--prompts-file", f"{{tmp}}/{name}", *FAST, "-o", "{tmp}/out/"), 2,
                                    (f"{{tmp}}/{name}{expect}",), files={name: text}) for why, name, text, expect in [
        ("bad JSON", "p.jsonl", '{"prompt": "ok"}\n{"prompt": "bad",\n', ":2: not valid JSON"),
        ("bad steps", "p.jsonl", '{"prompt": "ok"}\n\n{"prompt": "a", "steps": 0}\n',
         ":3: steps must be between 1 and 100, got 0"),
        ("unknown key", "p.jsonl", '{"prompt": "ok", "stepz": 3}\n', ":1: unknown key(s) stepz"),
        ("blank prompt", "p.jsonl", '{"prompt": "ok"}\n{"prompt": "  "}\n', ':2: "prompt" is missing or empty'),
        ("not an object", "p.jsonl", '["a list"]\n', ":1: expected a JSON object, got list"),
        ("bad width", "p.jsonl", '{"prompt": "a", "width": 300}\n', ":1: width must be a multiple of 16, got 300"),
        ("bad aspect", "p.jsonl", '{"prompt": "a", "aspect": "2:1"}\n', ":1: unknown aspect '2:1'"),
        ("aspect and width", "p.jsonl", '{"prompt": "a"}\n{"prompt": "a", "aspect": "1:1", "width": 512}\n',
         ":2: give either an aspect"),
        ("JSON line in a text file", "p.txt", 'a cat\n# fine\n{"prompt": "x", "n": 0}\n',
         ":3: n must be between 1 and 16, got 0"),
        ("only comments", "p.txt", "\n# only comments\n", " has no prompts"),
        ("escaped lone surrogate", "p.jsonl", '{"prompt": "ok"}\n{"prompt": "a \\udcff cat"}\n',
         ":2: prompt cannot be encoded as UTF-8: character 3 is '\\udcff'"),
        ("escaped lone surrogate in the negative prompt", "p.jsonl",
         '{"prompt": "ok", "negative_prompt": "\\udc80", "guidance": 1}\n',
         ":1: negative prompt cannot be encoded as UTF-8: character 1 is '\\udc80'"),
    ]},
    "prompts file with bytes that are not UTF-8": Case(
        gen("--prompts-file", "{tmp}/p.txt", *FAST, "-o", "{tmp}/out/"), 2,
        ("prompts file {tmp}/p.txt cannot be read", "can't decode byte 0xff"), files={"p.txt": b"a cat\n\xff\xfe dog\n"}),
    "prompts file that does not exist": Case(gen("--prompts-file", "{tmp}/nope.txt", "-o", "{tmp}/out/"), 2,
                                             ("prompts file {tmp}/nope.txt does not exist",)),
    "two lines, one output file": Case(gen("--prompts-file", "{tmp}/p.txt", *FAST, *OUT), 2,
                                       ("{tmp}/x.png would be written twice",), files={"p.txt": "a\nb\n"}),
    # -------------------------------------------------------------------------------- outputs
    "output under a regular file": Case(gen("-p", "a cat", *FAST, "-o", "{tmp}/a-file/x.png"), 2,
                                        ("output folder {tmp}/a-file is not a folder",), files={"a-file": "x"}),
    "output folder under a regular file": Case(gen("-p", "a cat", *FAST, "-o", "{tmp}/a-file/sub/"), 2,
                                               ("output folder {tmp}/a-file/sub cannot be created: {tmp}/a-file is "
                                                "not a folder",), files={"a-file": "x"}),
    "output in a folder that does not exist": Case(gen("-p", "a cat", *FAST, "-o", "{tmp}/missing/x.png"), 2,
                                                   ("output folder {tmp}/missing does not exist",)),
    "output not a .png": Case(gen("-p", "a cat", *FAST, "-o", "{tmp}/x.jpg"), 2, ("'{tmp}/x.jpg' must end in .png",)),
    "output exists": Case(gen("-p", "a cat", *FAST, *OUT), 2, ("{tmp}/x.png exists; pass --overwrite",),
                          files={"x.png": b"precious"}),
    "numbered output exists": Case(gen("-p", "a cat", *FAST, "--n", "2", *OUT), 2,
                                   ("{tmp}/x-2.png exists; pass --overwrite",), files={"x-2.png": b"precious"}),
    # -------------------------------------------------------------------------------- --from-png and show
    "from-png without parameters": Case(gen("--from-png", "{tmp}/in.png", *OUT), 2,
                                        ("{tmp}/in.png carries no zimage generation parameters",),
                                        files={"in.png": png()}),
    "show without parameters": Case(("show", "{tmp}/in.png"), 2,
                                    ("{tmp}/in.png carries no zimage generation parameters",), files={"in.png": png()}),
    "from-png with A1111 parameters only": Case(
        gen("--from-png", "{tmp}/in.png", *OUT), 2, ("no zimage generation parameters", "it has A1111 parameters"),
        files={"in.png": png(a1111="a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")}),
    "from-png not an image": Case(gen("--from-png", "{tmp}/in.png", *OUT), 2, ("{tmp}/in.png is not a readable image",),
                                  files={"in.png": "not a png"}),
    "from-png that does not exist": Case(gen("--from-png", "{tmp}/gone.png", *OUT), 2, ("{tmp}/gone.png does not exist",)),
    "show a file that does not exist": Case(("show", "{tmp}/gone.png"), 2, ("{tmp}/gone.png does not exist",)),
    "from-png with a damaged record": Case(gen("--from-png", "{tmp}/in.png", *OUT), 1,
                                           ("{tmp}/in.png: its zimage parameters cannot be read",),
                                           files={"in.png": png("{not json")}),
    "from-png with a record missing fields": Case(gen("--from-png", "{tmp}/in.png", *OUT), 1,
                                                  ("{tmp}/in.png: its zimage parameters cannot be read",),
                                                  files={"in.png": png({"prompt": "x"})}),
    "from-png whose prompt is not UTF-8": Case(
        gen("--from-png", "{tmp}/in.png", *OUT), 2, ("prompt cannot be encoded as UTF-8: character 3 is '\\udcff'",),
        files={"in.png": png(json.dumps({**RECORD, "prompt": "a \udcff cat"}))}),
    "from-png made from a folder, without --model": Case(
        gen("--from-png", "{tmp}/in.png", "--device", "cpu", *OUT), 2,
        ("{tmp}/in.png was made with the model in a folder named 'Z-Image-Tiny'", "pass --model with that folder"),
        files={"in.png": png({**RECORD, "model": "Z-Image-Tiny"})}),
    "from-png with a bad override": Case(gen("--from-png", "{tmp}/in.png", "--steps", "0", *OUT), 2,
                                         ("steps must be between 1 and 100, got 0",), files={"in.png": png(RECORD)}),
    # -------------------------------------------------------------------------------- image inputs
    "strength 0": Case(gen("-p", "a cat", "--image", "{tmp}/in.png", "--strength", "0", *IMG, *IMG, *OUT), 2,
                       ("strength must be greater than 0 and at most 1", "got 0.0"), files={"in.png": PICTURE}),
    "strength 1.5": Case(gen("-p", "a cat", "--image", "{tmp}/in.png", "--strength", "1.5", *IMG, *IMG, *OUT), 2, ("got 1.5",),
                         files={"in.png": PICTURE}),
    "strength nan": Case(gen("-p", "a cat", "--image", "{tmp}/in.png", "--strength", "nan", *IMG, *IMG, *OUT), 2, ("got nan",),
                         files={"in.png": PICTURE}),
    "image that does not exist": Case(gen("-p", "a cat", "--image", "{tmp}/gone.png", *IMG, *IMG, *OUT), 2,
                                      ("image file {tmp}/gone.png does not exist",)),
    "image that is not a picture": Case(gen("-p", "a cat", "--image", "{tmp}/in.png", *IMG, *IMG, *OUT), 2,
                                        ("{tmp}/in.png is not a picture zimage reads; use PNG, JPEG or WebP",),
                                        files={"in.png": "hello"}),
    "mask without an image": Case(gen("-p", "a cat", "--mask", "{tmp}/m.png", *IMG, *IMG, *OUT), 2, ("--mask needs --image",),
                                  files={"m.png": MASK_WHITE}),
    "strength without an image": Case(gen("-p", "a cat", "--strength", "0.5", *IMG, *IMG, *OUT), 2, ("--strength needs --image",)),
    "all-black mask": Case(gen("-p", "a cat", "--image", "{tmp}/in.png", "--mask", "{tmp}/m.png", *IMG, *IMG, *OUT), 2,
                           ("the mask {tmp}/m.png is all black: nothing to repaint",),
                           files={"in.png": PICTURE, "m.png": MASK_BLACK}),
    "mask of another size": Case(gen("-p", "a cat", "--image", "{tmp}/in.png", "--mask", "{tmp}/m.png", *IMG, *IMG, *OUT), 2,
                                 ("is 128x128 but the image is 256x256", "choose a resize mode"),
                                 files={"in.png": PICTURE, "m.png": MASK_SMALL}),
    "outpaint beyond the size limit": Case(gen("-p", "a cat", "--image", "{tmp}/in.png", "--outpaint", "0,0,2000,0", *IMG, *IMG, *OUT), 2,
                                           ("gives a 2256x256 canvas: width must be between 256 and 2048",),
                                           files={"in.png": PICTURE}),
    "outpaint with a mask": Case(gen("-p", "a cat", "--image", "{tmp}/in.png", "--outpaint", "0,0,16,0", "--mask",
                                     "{tmp}/m.png", *IMG, *OUT), 2, ("leave out --mask",), files={"in.png": PICTURE, "m.png": MASK_WHITE}),
    "from-png made from an image, without --image": Case(
        gen("--from-png", "{tmp}/in.png", *IMG, *IMG, *OUT), 2, ("was made from an input image (300x256", "give it with --image"),
        files={"in.png": png({**RECORD, "image": {"sha256": "ab" * 32, "width": 256, "height": 256,
                                                  "source_width": 300, "source_height": 256}, "strength": 0.5})}),
    # -------------------------------------------------------------------------------- LoRA
    "lora that does not exist": Case(gen("-p", "a cat", "--lora", "{tmp}/none.safetensors", *IMG, *IMG, *OUT), 2,
                                     ("LoRA '{tmp}/none.safetensors': no such file",), loads=True),
    "lora strength out of range": Case(gen("-p", "a cat", "--lora", "{tmp}/x.safetensors:20", *IMG, *IMG, *OUT), 2,
                                       ("the strength must be between -10 and 10, got 20",)),
    "lora that is not safetensors": Case(gen("-p", "a cat", "--lora", "{tmp}/x.ckpt", *IMG, *IMG, *OUT), 2, ("{tmp}/x.ckpt",), loads=True,
                                         files={"x.ckpt": b"PK\x03\x04" + b"\0" * 64}),
    "from-png made with a LoRA that is gone": Case(
        gen("--from-png", "{tmp}/in.png", *IMG, *IMG, *OUT), 2, ("was made with LoRA 'style'", "give it with --lora"),
        files={"in.png": png({**RECORD, "loras": [{"name": "style", "file": "/nowhere/style.safetensors",
                                                   "scale": 0.8, "sha256": "cd" * 32, "short_hash": "cdcdcdcdcdcd"}]})}),
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


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input(case, tmp_path, capsys, count_loads, tiny_folder):
    def fill(s: str) -> str:
        return s.replace("{tmp}", str(tmp_path))

    if case.model_copy:
        shutil.copytree(tiny_folder, tmp_path / "model")
        case.damage(tmp_path / "model")
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
        assert count_loads == []  # found before Engine.load


def test_argparse_type_error(capsys):
    """argparse's own errors: exit 2 with its usage line (the one message shape that zimage does not write)."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "-p", "a", "--steps", "many"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "zimage generate: error: argument --steps: invalid int value: 'many'" in err and "Traceback" not in err


def test_cuda_without_a_gpu(tmp_path, capsys, count_loads):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [a for a in FAST if a not in ("--device", "cpu")]
    for argv in (["generate", "-p", "a cat", *args, "--device", "cuda", "-o", str(tmp_path / "x.png")],
                 ["info", "--device", "cuda:1"]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 1 and err.startswith("zimage: error: ") and "no CUDA GPU" in err and "Traceback" not in err
        assert f"--device {argv[argv.index('--device') + 1]}" in err
    assert list(tmp_path.iterdir()) == []


def test_output_folder_read_only(tmp_path, capsys):
    """A read-only folder: refused before loading when the check can see it (not root); for root, whom the kernel
    lets write, the image is written, which is correct. Either way no partial file appears."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(["generate", "-p", "a cat", *FAST, "-o", str(ro / "x.png")])
        err = capsys.readouterr().err
        if os.geteuid() != 0:
            assert rc == 2 and f"output folder {ro} is not writable" in err
            assert list(ro.iterdir()) == []
        else:
            assert rc == 0 and [p.name for p in ro.iterdir()] == ["x.png"]
    finally:
        ro.chmod(0o755)


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
