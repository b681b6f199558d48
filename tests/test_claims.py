"""What the package docstring, the README and --help promise, checked: the examples run as written (on the tiny
model), the limits printed are the limits enforced, the commands named exist, and the seed claim holds as stated."""

from __future__ import annotations

import re
import textwrap
from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import pytest

import zimage
from zimage.cli.main import main
from zimage.request import MAX_PROMPT_CHARS, GenerateRequest

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = 'model="Tongyi-MAI/Z-Image-Turbo"'


def run_example(code: str, tiny_folder: Path, folder: Path, monkeypatch) -> None:
    """Run `code` as written, on the tiny model instead of the published one, in `folder`."""
    assert PUBLISHED in code, code
    monkeypatch.chdir(folder)
    code = code.replace(PUBLISHED, f"model={str(tiny_folder)!r}, device='cpu'")
    exec(compile(code, "<example>", "exec"), {})


def test_package_docstring_example_runs(tiny_folder, tmp_path, monkeypatch):
    lines = [line for line in zimage.__doc__.splitlines() if line.startswith("    ")]
    code = textwrap.dedent("\n".join(lines))
    run_example(code, tiny_folder, tmp_path, monkeypatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]
    from PIL import Image

    with Image.open(tmp_path / "cat.png") as im:
        assert im.format == "PNG" and im.size == (1024, 1024)


def test_readme_python_example_runs(tiny_folder, tmp_path, monkeypatch):
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "the README has no Python example"
    run_example(blocks[0], tiny_folder, tmp_path, monkeypatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-42.png", "cat-43.png"]


@pytest.mark.parametrize("flag", ["--prompt", "--negative-prompt"])
def test_prompt_length_limit_is_in_help(capsys, flag):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    entry = text[text.index("what to make:"):]
    entry = entry[entry.index(f"{flag} {flag.lstrip('-').upper().replace('-', '_')}"):]
    assert f"at most {MAX_PROMPT_CHARS:,} characters" in entry[:200]


def test_missing_weights_hint_names_commands_that_are_installed():
    """The hint's huggingface_hub command is one that the installed huggingface_hub provides (it dropped
    `huggingface-cli` for `hf`), and its `download` takes the repo id: run through the console script's own entry
    point (no PATH needed)."""
    import subprocess
    import sys

    from zimage.weights.layout import HOW_TO_GET

    assert "  hf download Tongyi-MAI/Z-Image-Turbo" in HOW_TO_GET.splitlines()
    scripts = {e.name: e for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    assert "hf" in scripts and "huggingface-cli" not in scripts and "huggingface-cli" not in HOW_TO_GET
    module, _, attr = scripts["hf"].value.partition(":")
    run = f"import sys; from {module} import {attr} as cli; sys.argv = ['hf', 'download', '--help']; cli()"
    p = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "REPO_ID" in p.stdout


def test_same_seed_in_a_batch_differs_from_alone_by_at_most_one_level_in_few_values(engine):
    """The README's seed claim as measured: image i of a batch and the same seed alone share their noise exactly;
    the pixels differ by at most 1/255, in under 0.1% of the values (measured on this tiny fp32 CPU model: 3-38
    of 196,608-786,432 values per image, 0.004% over 17 images), from float rounding of batched matrix products."""
    batch = GenerateRequest(prompts=("a tower", "a dog in a garden, watercolor"), n=2, width=256, height=256,
                            steps=2, seed=77)
    images = engine.generate(batch).images
    differing, total = 0, 0
    for i, im in enumerate(images):
        alone = engine.generate(batch.single(i)).images[0]
        d = np.abs(np.asarray(im.image, dtype=np.int16) - np.asarray(alone.image, dtype=np.int16))
        assert d.max() <= 1
        differing += int((d > 0).sum())
        total += d.size
    assert differing / total < 1e-3


def test_no_file_cites_documents_outside_the_repository():
    """Facts are stated where they are used: no code, test or doc points at notes that are not in the repository
    (the design notes and the device's machine notes live outside it)."""
    root = Path(__file__).resolve().parents[1]
    outside = ("DESIGN.md", "KINDS.md", "METHOD.md", "HOPPER.md", "H200.md")
    cited = []
    for path in [*root.glob("zimage/**/*.py"), *root.glob("benchmarks/*.py"), *root.glob("tests/**/*.py"),
                 *root.glob("*.md"), *root.glob("docs/*.md"), *root.glob("deploy/*")]:
        if path.resolve() == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        cited += [f"{path.relative_to(root)}: {name}" for name in outside if name in text]
    assert not cited, cited
