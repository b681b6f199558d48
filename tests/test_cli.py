"""The `zimage` CLI, in-process through zimage.cli.main.main (fast) and, a few times, as a real subprocess.

Bad inputs (exit codes, messages, nothing written) are in test_cli_bad_input.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage.cli.main import main

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny-random", "--device", "cpu", "--width", "256", "--height", "256", "--steps", "2"]


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


# ------------------------------------------------------------------------------------------------ good runs
def test_generate_writes_png_with_both_metadata_chunks(capsys, out):
    target = out / "cat.png"
    rc, stdout, stderr = cli(capsys, "generate", "-p", "a cat in the snow", *FAST, "--seed", "42", "-o", target)
    assert rc == 0, stderr
    assert stdout.strip() == str(target)
    assert "tiny randomly initialised" in stderr and "noise" in stderr  # the CLI says so
    with Image.open(target) as im:
        assert im.format == "PNG" and im.size == (256, 256) and im.mode == "RGB"
        text = dict(im.text)
    assert text["parameters"].splitlines() == [
        "a cat in the snow",
        "Steps: 2, Sampler: Euler (flow matching), CFG scale: 0, Seed: 42, Size: 256x256, Model: tiny-random, "
        f"Version: zimage {__import__('zimage').__version__}",
    ]
    record = json.loads(text["zimage"])
    assert record == {
        "prompt": "a cat in the snow", "negative_prompt": "", "seed": 42, "steps": 2, "guidance": 0.0,
        "width": 256, "height": 256, "model": "tiny-random", "model_revision": None, "dtype": "fp32",
        "sampler": "Euler (flow matching)", "zimage_version": __import__("zimage").__version__,
        "loras": [], "image": None, "mask": None, "strength": None, "resize": None, "recipe": "turbo",
    }
    assert pixels(target).std() > 1  # an image, not a flat colour
    assert files_in(out) == ["cat.png"]  # no temp files left


def test_negative_prompt_and_guidance_recorded(capsys, out):
    target = out / "cfg.png"
    rc, _, err = cli(capsys, "generate", "-p", "a dog", "--negative-prompt", "blurry", "--guidance", "2.5", *FAST,
                     "--seed", "3", "-o", target)
    assert rc == 0, err
    with Image.open(target) as im:
        params = im.text["parameters"]
    assert params.splitlines()[1] == "Negative prompt: blurry"
    assert "CFG scale: 2.5" in params


NEGATIVE_IGNORED = "warning: --negative-prompt is used only with --guidance > 0; it is ignored"


def test_negative_prompt_without_guidance_warns_once(capsys, out):
    rc, _, err = cli(capsys, "generate", "-p", "a dog", "--negative-prompt", "blurry", *FAST, "--n", "2",
                     "-o", out / "x.png")
    assert rc == 0, err
    assert err.count("warning: ") == 1 and f"{NEGATIVE_IGNORED}\n" in err
    assert json.loads(Image.open(out / "x-1.png").text["zimage"])["negative_prompt"] == ""  # as it was made
    rc, _, err = cli(capsys, "generate", "-p", "a dog", "--negative-prompt", "blurry", "--guidance", "1", *FAST,
                     "-o", out / "y.png")
    assert rc == 0 and "warning" not in err


def test_negative_prompt_without_guidance_in_a_prompts_file_warns_once_naming_the_lines(capsys, out, tmp_path):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "a", "negative_prompt": "ugly"}\n{"prompt": "b", "negative_prompt": "ugly", '
                  '"guidance": 1.5}\n{"prompt": "c"}\n{"prompt": "d", "negative_prompt": "dull"}\n')
    rc, _, err = cli(capsys, "generate", "--prompts-file", pf, *FAST, "-o", f"{out}/")
    assert rc == 0, err
    assert err.count("warning: ") == 1
    assert (f"warning: a negative prompt is used only with guidance > 0; it is ignored for {pf}:1, {pf}:4\n") in err


def test_negative_prompt_of_a_png_dropped_by_guidance_0_warns(capsys, out):
    first = out / "cfg.png"
    assert cli(capsys, "generate", "-p", "a dog", "--negative-prompt", "blurry", "--guidance", "2", *FAST,
               "-o", first)[0] == 0
    rc, _, err = cli(capsys, "generate", "--from-png", first, "--guidance", "0", "--device", "cpu",
                     "-o", out / "no-cfg.png")
    assert rc == 0, err
    assert f"warning: the negative prompt of {first} is used only with --guidance > 0; it is ignored\n" in err


def test_show_prints_parameters(capsys, out):
    target = out / "x.png"
    assert cli(capsys, "generate", "-p", "a red fox", *FAST, "--seed", "9", "-o", target)[0] == 0
    rc, stdout, _ = cli(capsys, "show", target)
    assert rc == 0
    assert stdout.startswith("a red fox\nSteps: 2, ") and "Seed: 9" in stdout
    rc, stdout, _ = cli(capsys, "show", "--json", target)
    assert rc == 0 and json.loads(stdout)["seed"] == 9 and json.loads(stdout)["prompt"] == "a red fox"


def test_from_png_remakes_the_same_pixels(capsys, out):
    first, again, other = out / "first.png", out / "again.png", out / "other.png"
    assert cli(capsys, "generate", "-p", "a lighthouse", *FAST, "--seed", "123", "--width", "256", "--height", "320",
               "-o", first)[0] == 0
    rc, _, err = cli(capsys, "generate", "--from-png", first, "--model", "tiny-random", "--device", "cpu", "-o", again)
    assert rc == 0, err
    assert pixels(again).shape == (320, 256, 3)
    assert np.array_equal(pixels(first), pixels(again))
    # flags override what the PNG says
    assert cli(capsys, "generate", "--from-png", first, "--seed", "124", "--model", "tiny-random", "--device", "cpu",
               "-o", other)[0] == 0
    assert not np.array_equal(pixels(first), pixels(other))
    with Image.open(other) as im:
        assert json.loads(im.text["zimage"])["seed"] == 124


def test_from_png_uses_the_model_it_records(capsys, out, count_loads):
    """Without --model, --from-png loads the model the PNG records (here tiny-random), not --model's default."""
    first, again = out / "first.png", out / "again.png"
    assert cli(capsys, "generate", "-p", "a lighthouse", *FAST, "--seed", "5", "-o", first)[0] == 0
    rc, _, err = cli(capsys, "generate", "--from-png", first, "--device", "cpu", "-o", again)
    assert rc == 0, err
    assert count_loads[-1][0].model == "tiny-random"
    assert np.array_equal(pixels(first), pixels(again))
    assert json.loads(Image.open(again).text["zimage"])["model"] == "tiny-random"


def test_from_png_explicit_model_wins_even_when_it_is_the_default_text(capsys, out, tiny_folder, count_loads):
    """--model given is used, whatever the PNG says; given as the default's own text, it is still 'given'."""
    from zimage.weights.layout import DEFAULT_MODEL_ID

    first = out / "first.png"
    assert cli(capsys, "generate", "-p", "a lighthouse", *FAST, "--seed", "5", "-o", first)[0] == 0
    rc, _, err = cli(capsys, "generate", "--from-png", first, "--model", tiny_folder, "--device", "cpu",
                     "-o", out / "b.png")
    assert rc == 0, err
    assert count_loads[-1][0].model == str(tiny_folder)
    assert json.loads(Image.open(out / "b.png").text["zimage"])["model"] == tiny_folder.name
    rc, _, err = cli(capsys, "generate", "--from-png", first, "--model", DEFAULT_MODEL_ID, "--device", "cpu",
                     "-o", out / "c.png")
    assert rc == 1 and f"model {DEFAULT_MODEL_ID!r} was not found" in err  # looked for before any load


def test_from_png_made_from_a_folder_needs_model(capsys, out, tiny_folder, count_loads):
    """A PNG made from a folder records the folder's name, not its path (paths stay private): --from-png then asks
    for --model before loading anything, and works with it."""
    first = out / "first.png"
    assert cli(capsys, "generate", "-p", "a lighthouse", *FAST, "--model", tiny_folder, "--seed", "5",
               "-o", first)[0] == 0
    loads = len(count_loads)
    rc, _, err = cli(capsys, "generate", "--from-png", first, "--device", "cpu", "-o", out / "again.png")
    assert rc == 2
    assert err == (f"zimage: error: {first} was made with the model in a folder named {tiny_folder.name!r} (a PNG "
                   "records a folder's name, not its path); pass --model with that folder\n")
    assert len(count_loads) == loads and not (out / "again.png").exists()
    rc, _, err = cli(capsys, "generate", "--from-png", first, "--model", tiny_folder, "--device", "cpu",
                     "-o", out / "again.png")
    assert rc == 0, err
    assert np.array_equal(pixels(first), pixels(out / "again.png"))


def test_model_flag_help_still_shows_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "(default: Tongyi-MAI/Z-Image-Turbo)" in " ".join(capsys.readouterr().out.split())


def test_several_images_get_numbered_names(capsys, out):
    target = out / "name.png"
    rc, stdout, err = cli(capsys, "generate", "-p", "a bird", *FAST, "--seed", "5", "--n", "2", "-o", target)
    assert rc == 0, err
    assert files_in(out) == ["name-1.png", "name-2.png"]
    assert stdout.split() == [str(out / "name-1.png"), str(out / "name-2.png")]
    seeds = [json.loads(Image.open(out / f"name-{i}.png").text["zimage"])["seed"] for i in (1, 2)]
    assert seeds == [5, 6]


def test_folder_output_and_no_overwrite_of_automatic_names(capsys, tmp_path):
    folder = tmp_path / "new" / "folder"
    rc, _, err = cli(capsys, "generate", "-p", "A Cat, in snow!", *FAST, "--seed", "7", "-o", f"{folder}/")
    assert rc == 0, err
    assert files_in(folder) == ["a-cat-in-snow-7.png"]
    before = (folder / "a-cat-in-snow-7.png").read_bytes()
    assert cli(capsys, "generate", "-p", "A Cat, in snow!", *FAST, "--seed", "7", "--guidance", "1", "-o",
               f"{folder}/")[0] == 0
    assert files_in(folder) == ["a-cat-in-snow-7-1.png", "a-cat-in-snow-7.png"]
    assert (folder / "a-cat-in-snow-7.png").read_bytes() == before


def test_existing_folder_without_trailing_slash_is_a_folder(capsys, out):
    assert cli(capsys, "generate", "-p", "tree", *FAST, "--seed", "1", "-o", out)[0] == 0
    assert files_in(out) == ["tree-1.png"]


def test_default_output_is_the_current_folder(capsys, out, monkeypatch):
    monkeypatch.chdir(out)
    assert cli(capsys, "generate", "-p", "sea", *FAST, "--seed", "2")[0] == 0
    assert files_in(out) == ["sea-2.png"]


def test_overwrite(capsys, out):
    target = out / "img.png"
    assert cli(capsys, "generate", "-p", "a house", *FAST, "--seed", "1", "-o", target)[0] == 0
    before = target.read_bytes()
    rc, _, err = cli(capsys, "generate", "-p", "a house", *FAST, "--seed", "2", "-o", target)
    assert rc == 2
    assert f"{target} exists; pass --overwrite" in err
    assert target.read_bytes() == before and files_in(out) == ["img.png"]
    rc, _, err = cli(capsys, "generate", "-p", "a house", *FAST, "--seed", "2", "-o", target, "--overwrite")
    assert rc == 0, err
    assert target.read_bytes() != before
    assert json.loads(Image.open(target).text["zimage"])["seed"] == 2
    assert files_in(out) == ["img.png"]


def test_prompts_file_text_loads_model_once(capsys, out, tmp_path, count_loads):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a cat\n\n# a comment line\n  a dog  \nred car\n")
    rc, stdout, err = cli(capsys, "generate", "--prompts-file", pf, *FAST, "--seed", "11", "-o", f"{out}/")
    assert rc == 0, err
    assert len(count_loads) == 1
    assert files_in(out) == ["a-cat-11.png", "a-dog-11.png", "red-car-11.png"]
    assert json.loads(Image.open(out / "a-dog-11.png").text["zimage"])["prompt"] == "a dog"
    assert len(stdout.split()) == 3


def test_prompts_file_jsonl_per_line_settings(capsys, out, tmp_path, count_loads):
    pf = tmp_path / "jobs.jsonl"
    lines = [
        {"prompt": "a cat", "seed": 5, "steps": 1, "width": 256, "height": 320, "output": str(out / "cat.png")},
        {"prompt": "a dog", "negative_prompt": "ugly", "guidance": 2.0, "n": 2, "output": str(out / "dog.png")},
        {"prompt": "a cow"},
    ]
    pf.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rc, _, err = cli(capsys, "generate", "--prompts-file", pf, *FAST, "--seed", "20", "-o", f"{out}/")
    assert rc == 0, err
    assert len(count_loads) == 1
    assert files_in(out) == ["a-cow-20.png", "cat.png", "dog-1.png", "dog-2.png"]
    meta = {name: json.loads(Image.open(out / name).text["zimage"]) for name in files_in(out)}
    assert (meta["cat.png"]["seed"], meta["cat.png"]["steps"], meta["cat.png"]["width"], meta["cat.png"]["height"]) \
        == (5, 1, 256, 320)
    assert Image.open(out / "cat.png").size == (256, 320)
    assert [meta[f"dog-{i}.png"]["seed"] for i in (1, 2)] == [20, 21]
    assert meta["dog-1.png"]["negative_prompt"] == "ugly" and meta["dog-1.png"]["guidance"] == 2.0
    assert meta["a-cow-20.png"]["steps"] == 2 and meta["a-cow-20.png"]["guidance"] == 0.0  # flags as defaults


def test_prompts_file_aspect_per_line_overrides_flag_size(tmp_path):
    """Planning only (no generation at 1 MP): a line's aspect replaces the flags' width/height, and a line's
    width/height replace the flags' aspect."""
    from zimage.cli.generate import plan_jobs
    from zimage.cli.main import build_parser

    pf = tmp_path / "jobs.jsonl"
    pf.write_text('{"prompt": "wide", "aspect": "16:9"}\n{"prompt": "small", "width": 256, "height": 512}\n')
    args = build_parser().parse_args(["generate", "--prompts-file", str(pf), "--width", "512", "--height", "512",
                                      "-o", f"{tmp_path}/"])
    jobs = plan_jobs(args)
    assert [(j.request.width, j.request.height) for j in jobs] == [(1280, 720), (256, 512)]
    args = build_parser().parse_args(["generate", "--prompts-file", str(pf), "--aspect", "3:4", "-o", f"{tmp_path}/"])
    jobs = plan_jobs(args)
    assert [(j.request.width, j.request.height) for j in jobs] == [(1280, 720), (256, 512)]


def test_aspect_flag_sets_the_size():
    from zimage.cli.generate import plan_jobs
    from zimage.cli.main import build_parser

    args = build_parser().parse_args(["generate", "-p", "x", "--aspect", "9:16", "-o", "/tmp/"])
    assert (plan_jobs(args)[0].request.width, plan_jobs(args)[0].request.height) == (720, 1280)


def test_info(capsys):
    rc, stdout, _ = cli(capsys, "info", "--model", "tiny-random", "--device", "cpu")
    assert rc == 0
    import torch

    assert "torch " in stdout
    assert ("cuda:0 " if torch.cuda.is_available() else "no CUDA GPU visible") in stdout
    assert "would run on cpu in fp32" in stdout
    assert "model: tiny-random (tiny) at " in stdout
    for name in ("transformer", "text_encoder", "vae"):
        assert f"  {name}: " in stdout
    assert "memory plan: " in stdout


def test_info_model_not_found(capsys, tmp_path):
    rc, stdout, _ = cli(capsys, "info", "--model", "Nobody/Nothing", "--device", "cpu")
    assert rc == 1
    assert "model: NOT FOUND" in stdout and "models--Nobody--Nothing" in stdout and "zimage download" in stdout


def test_make_tiny(capsys, tmp_path):
    from safetensors import safe_open

    from zimage.weights.check import check_model_folder

    folder = tmp_path / "tiny"
    rc, stdout, _ = cli(capsys, "make-tiny", folder)
    assert rc == 0 and stdout.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"]
    t_shards = sorted((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(t_shards) >= 2 and (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    with safe_open(str(t_shards[0]), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F32"
    te = sorted((folder / "text_encoder").glob("model-*.safetensors"))
    with safe_open(str(te[0]), "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "BF16"
    assert "chat_template" in (folder / "tokenizer" / "tokenizer_config.json").read_text() or \
        (folder / "tokenizer" / "chat_template.jinja").is_file()
    check_model_folder(folder)
    rc, _, err = cli(capsys, "make-tiny", folder)  # not into a non-empty folder
    assert rc == 2 and f"{folder} exists and is not empty" in err


# ------------------------------------------------------------------------------------------------ subprocess
def run_zimage(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")  # as the in-process tests (see conftest.py)
    return subprocess.run([sys.executable, "-m", "zimage", *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_subprocess_generate(tmp_path):
    p = run_zimage("generate", "-p", "a cat", *FAST, "--seed", "4", "-o", "cat.png", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "cat.png"
    assert "noise" in p.stderr
    assert json.loads(Image.open(tmp_path / "cat.png").text["zimage"])["seed"] == 4


def test_entry_fast_exit_only_for_generate(monkeypatch):
    """`generate` skips the interpreter's teardown (os._exit, after flushing); every other command returns through
    sys.exit, so atexit handlers, non-daemon threads and finalizers run as a library user expects."""
    from zimage.cli import main as cli_main

    calls = []
    monkeypatch.setattr(cli_main, "run", lambda args: 3)
    monkeypatch.setattr(cli_main.logging, "shutdown", lambda: calls.append("logging flushed"))
    monkeypatch.setattr(cli_main.os, "_exit", lambda code: calls.append(("os._exit", code)))

    def sys_exit(code):
        calls.append(("sys.exit", code))
        raise SystemExit(code)

    monkeypatch.setattr(cli_main.sys, "exit", sys_exit)
    cli_main.entry(["generate", "-p", "x"])
    assert calls == ["logging flushed", ("os._exit", 3)]
    calls.clear()
    for command in (["serve"], ["info"], ["show", "x.png"], ["plan"], ["download"], ["make-tiny", "x"]):
        with pytest.raises(SystemExit):
            cli_main.entry(command)
    assert calls == [("sys.exit", 3)] * 6


ATEXIT_PROBE = """
import atexit, sys
atexit.register(lambda: print("atexit handlers ran", flush=True))
import zimage.cli.serve
zimage.cli.serve.run = lambda args: 0  # serve's exit path, without starting a server
from zimage.cli.main import entry
entry(sys.argv[1:])
"""


@pytest.mark.parametrize("argv, atexit_runs", [
    (["serve"], True),
    (["info", "--model", "tiny-random", "--device", "cpu"], True),
    (["generate", "-p", "a cat", *FAST, "-o", "x.png"], False),
])
def test_atexit_handlers_run_except_after_generate(tmp_path, argv, atexit_runs):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    p = subprocess.run([sys.executable, "-c", ATEXIT_PROBE, *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert ("atexit handlers ran" in p.stdout) == atexit_runs, (p.stdout, p.stderr)


def test_subprocess_usage_error_exit_code_and_message(tmp_path):
    p = run_zimage("generate", "-p", "a cat", "--width", "300", "-o", "x.png", cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == "zimage: error: width must be a multiple of 16, got 300 (nearest: 288 or 304)"
    assert p.stdout == "" and list(tmp_path.iterdir()) == []


def test_converted_cache_flag_writes_a_copy_then_reads_it(capsys, out, count_loads):
    """--converted-cache: the first run writes the bf16 copy of the fp32 transformer, the next reads it (same image);
    the first prompt is handed to the engine for its warm start."""
    from zimage.weights import load as wl
    from zimage.weights.locate import zimage_cache

    args = ["generate", "-p", "a cat", *FAST, "--dtype", "bf16", "--seed", "4", "--converted-cache"]
    folder = zimage_cache() / "converted"
    before = set(folder.iterdir()) if folder.is_dir() else set()  # the cache is shared by the session's tests
    assert cli(capsys, *args, "-o", out / "a.png")[0] == 0
    assert wl.LAST_STATS["transformer_from"] == "source"
    copies = sorted(p.name for p in set(folder.iterdir()) - before)
    assert [c.split("-")[0] for c in copies] == ["transformer"]  # the bf16 text encoder is not copied
    assert cli(capsys, *args, "-o", out / "b.png")[0] == 0
    assert wl.LAST_STATS["transformer_from"] == "converted cache"
    assert np.array_equal(pixels(out / "a.png"), pixels(out / "b.png"))
    config = count_loads[-1][0]
    assert config.converted_cache and config.warm_prompts == ("a cat",) and config.warm_size == (256, 256)
