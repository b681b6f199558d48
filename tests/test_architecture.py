"""Dependencies point one way: entrypoints (cli, server, deploy) -> engine -> {weights, memory, speed} -> models.

Every `import zimage.X` / `from zimage.X import ...` in the package, at module level or inside a function (zimage
imports lazily, so both count), is checked against the layer of the importing package. The shared data modules at
the root (errors, request, lora_spec, recipe, sizes, version) and io may be imported from the layers that list them, and
import no layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "zimage"

# package -> packages it may import (besides itself)
ALLOWED = {
    "models": {"errors"},
    "weights": {"models", "errors", "request", "sizes", "version"},
    "memory": {"models", "errors", "request", "sizes", "version"},
    "speed": {"models", "memory", "weights", "errors", "request", "sizes", "version"},
    "engine": {"models", "weights", "memory", "speed", "io", "errors", "request", "sizes", "version", "lora_spec",
               "recipe"},
    "io": {"errors", "version", "sizes"},
    "errors": set(),
    "lora_spec": {"errors"},
    "recipe": {"errors"},
    "request": {"errors", "sizes", "lora_spec", "io"},
    "sizes": {"errors"},
    "version": set(),
}
ENTRYPOINTS = ("cli", "server", "deploy", "__main__", "__init__")  # may import anything below them


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, top-level zimage package) of every zimage import in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "zimage":  # `from zimage import errors`
                names = [f"zimage.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "zimage" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
    return found


def layer_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        layer = layer_of(path, root)
        if layer in ENTRYPOINTS:
            continue
        allowed = ALLOWED.get(layer)
        assert allowed is not None, f"{path}: package {layer!r} has no layer in tests/test_architecture.py"
        for line, target in imports_of(path):
            if target != layer and target not in allowed:
                out.append(f"{path.relative_to(root.parent)}:{line}: {layer} imports zimage.{target}")
    return out


def test_no_lower_layer_imports_a_higher_one():
    assert violations() == []


def test_the_check_finds_an_upward_import(tmp_path):
    """The checker itself: a models module that imports the engine lazily (inside a function) is caught."""
    fake = tmp_path / "zimage"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("def f():\n    from zimage.engine.config import EngineConfig\n")
    (fake / "speed").mkdir()
    (fake / "speed" / "ok.py").write_text("from zimage.models.z_image import NATIVE\nimport zimage.memory.plan\n")
    found = violations(fake)
    assert found == ["zimage/models/bad.py:2: models imports zimage.engine"]


@pytest.mark.parametrize("package", sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"))
def test_every_package_has_a_layer(package):
    assert package in ALLOWED or package in ENTRYPOINTS
