"""The portable compile cache (zimage.speed.compile_cache) on CPU with the tiny model, the precompiled functions off
(ZIMAGE_PRECOMPILED=0: torch.compile's path, which this cache serves; tests/test_precompiled.py tests them with it):
a first compiled process writes the artifact file after its first image; a second process with an empty inductor
folder loads it, compiles nothing and makes the same image; a changed key or a corrupt file is not loaded and is
rebuilt.

Each test has its own zimage cache and no TORCHINDUCTOR_CACHE_DIR (conftest's shared one is unset), so inductor's
local caches are zimage's own folder in it: empty unless the test copied one in.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zimage.speed import compile_cache

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from torch._dynamo.utils import counters  # imported first, as a library caller might (inductor sets its default)
from zimage.engine.engine import Engine
from zimage.request import GenerateRequest

engine = Engine.load(model=sys.argv[1], device="cpu", dtype="fp32", speed="compile")
artifacts = engine.speed_setup.artifacts
before = artifacts.path.exists()
result = engine.generate(GenerateRequest(prompts=("a lighthouse at dusk",), width=256, height=256, steps=2, seed=5))
print(json.dumps({"path": str(artifacts.path), "exists_before": before, "status": artifacts.status,
                  "loaded": artifacts.loaded, "saves": artifacts.saves, "inductor": dict(counters["inductor"]),
                  "aot": dict(counters["aot_autograd"]), "pixels": hashlib.sha256(result.images[0].image.tobytes()).hexdigest()}))
"""


def run_child(model: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env.update(ZIMAGE_CACHE=str(cache), ZIMAGE_PRECOMPILED="0", PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", CHILD, str(model)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["log"] = out.stderr
    return res


@pytest.fixture(scope="module")
def first(tiny_folder, tmp_path_factory):
    """A first compiled process on an empty zimage cache, and a copy of that cache as it left it (the artifact file
    and inductor's local entries)."""
    cache = tmp_path_factory.mktemp("cc-first")
    res = run_child(tiny_folder, cache)
    warm = tmp_path_factory.mktemp("cc-warm") / "cache"
    shutil.copytree(cache, warm)
    return res, cache, warm


def test_first_compiled_generation_writes_the_artifact_file(first):
    res, cache, _ = first
    path = Path(res["path"])
    assert path.parent == cache / "compile-artifacts" and path.suffix == ".zca"
    assert not res["exists_before"] and res["status"] == "absent"  # written after the generation, not at load
    assert res["saves"] == 1 and "artifacts saved to" in res["log"]
    key, segments = compile_cache.read_file(path)
    assert len(segments) == 1 and {t for t, _ in segments[0].artifacts} >= {"inductor", "aot_autograd"}
    assert key["source"] == compile_cache.source_digest() and key["device"]["type"] == "cpu"
    assert key["speed"]["mode"] == "compile" and key["speed"]["fused"] is True and key["dtypes"] == ["torch.float32"]
    assert (cache / "inductor").is_dir()  # inductor compiled into zimage's folder (not its default one)


def test_a_second_process_loads_it_and_compiles_nothing(first, tiny_folder):
    res, cache, _ = first
    # inductor's graph caches deleted: every FX-graph / AOTAutograd hit below comes from the artifact file. (Its C++
    # kernel libraries are kept, only to spare the CPU rebuilding them: the artifact does not carry them, see
    # BENCHMARKS.md; nothing finds a kernel library without its graph.)
    for name in ("fxgraph", "aotautograd"):
        shutil.rmtree(cache / "inductor" / name)
    second = run_child(tiny_folder, cache)
    assert second["status"] == "loaded" and second["loaded"]["inductor"] >= 1 and second["exists_before"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and not second["inductor"].get("fxgraph_cache_miss")
    assert second["aot"].get("autograd_cache_hit", 0) >= 1 and not second["aot"].get("autograd_cache_miss")
    assert second["pixels"] == res["pixels"]  # the same kernels: the same image, bit for bit
    assert second["saves"] == 0  # it compiled nothing the file lacks: not rewritten


def _own_cache(monkeypatch, tmp_path, warm: Path) -> Path:
    cache = tmp_path / "cache"
    shutil.copytree(warm, cache)
    monkeypatch.setenv("ZIMAGE_CACHE", str(cache))
    monkeypatch.setenv("ZIMAGE_PRECOMPILED", "0")  # the portable cache alone (tests/test_precompiled.py: with them)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    return cache


def _generate(tiny_folder):
    from zimage.engine.engine import Engine
    from zimage.request import GenerateRequest

    engine = Engine.load(model=str(tiny_folder), device="cpu", dtype="fp32", speed="compile")
    engine.generate(GenerateRequest(prompts=("a lighthouse at dusk",), width=256, height=256, steps=2, seed=5))
    return engine.speed_setup.artifacts


@pytest.mark.parametrize("change", ["source", "torch"])
def test_a_changed_key_is_not_loaded_and_the_file_is_rebuilt(first, tiny_folder, tmp_path, monkeypatch, caplog,
                                                             change):
    res, _, warm = first
    _own_cache(monkeypatch, tmp_path, warm)
    if change == "source":  # an edited forward
        monkeypatch.setattr(compile_cache, "source_digest", lambda: "edited")
    else:
        real = compile_cache.build_id
        monkeypatch.setattr(compile_cache, "build_id", lambda: {**real(), "torch": "9.9.9+cu999"})
    with caplog.at_level(logging.INFO, logger="zimage"):
        artifacts = _generate(tiny_folder)
    assert artifacts.path.name == Path(res["path"]).name  # the same configuration: the same file
    assert artifacts.status == "stale" and artifacts.loaded == {}
    assert "was made for another build" in caplog.text and ("source" if change == "source" else "build") in caplog.text
    assert artifacts.saves == 1  # rebuilt: overwritten with this build's key
    key, _ = compile_cache.read_file(artifacts.path)
    assert key == artifacts.key and (key["source"] == "edited" or key["build"]["torch"] == "9.9.9+cu999")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_a_corrupt_file_is_ignored_with_a_warning(first, tiny_folder, tmp_path, monkeypatch, caplog, damage):
    res, _, warm = first
    cache = _own_cache(monkeypatch, tmp_path, warm)
    path = cache / "compile-artifacts" / Path(res["path"]).name
    blob = path.read_bytes()
    path.write_bytes({"garbage": b"\x00not an artifact file", "truncated": blob[:-100],
                      "flipped": blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:]}[damage])
    with caplog.at_level(logging.INFO, logger="zimage"):
        artifacts = _generate(tiny_folder)  # the generation succeeds
    assert artifacts.status == "corrupt" and artifacts.loaded == {}
    assert any(r.levelno == logging.WARNING and "is unreadable" in r.getMessage() for r in caplog.records)
    assert artifacts.saves == 1
    compile_cache.read_file(path)  # rebuilt: a whole file again


def test_it_can_be_turned_off(tiny_folder, monkeypatch):
    """EngineConfig(compile_cache=False) or ZIMAGE_COMPILE_CACHE=0: no artifacts object, nothing loaded or saved."""
    from zimage.engine.engine import Engine
    from zimage.speed import apply as speed_apply

    monkeypatch.setattr(speed_apply, "compile_blocks", lambda *a: None)  # the choice is under test, not inductor
    assert Engine.load(model=str(tiny_folder), speed="compile").speed_setup.artifacts is not None
    assert Engine.load(model=str(tiny_folder), speed="compile", compile_cache=False).speed_setup.artifacts is None
    monkeypatch.setenv("ZIMAGE_COMPILE_CACHE", "0")
    assert Engine.load(model=str(tiny_folder), speed="compile").speed_setup.artifacts is None
    assert Engine.load(model=str(tiny_folder), speed="eager", compile_cache=True).speed_setup.artifacts is None


def test_segments_of_other_processes_are_kept_unless_covered(tmp_path, monkeypatch):
    """save(): this process's (cumulative) segment replaces what it covers; an earlier process's entries that it did
    not use stay in the file."""
    from torch.compiler._cache import CacheInfo

    path = tmp_path / "x.zca"
    old_a = compile_cache.segment(b"A", [("inductor", "a")])
    old_b = compile_cache.segment(b"B", [("inductor", "b")])
    compile_cache.write_file(path, {"k": 1}, [old_a, old_b])
    artifacts = compile_cache.CompileArtifacts("x", {"k": 1}, tmp_path)
    artifacts.tried, artifacts.status, artifacts._kept = True, "loaded", [old_a, old_b]
    info = CacheInfo()
    info.artifacts["inductor"] += ["a", "c"]
    monkeypatch.setattr("torch.compiler.save_cache_artifacts", lambda: (b"AC", info))
    monkeypatch.setattr("torch.compiler._cache.CacheArtifactManager.need_serialize", classmethod(lambda cls: True))
    assert artifacts.save()
    key, segments = compile_cache.read_file(path)
    assert key == {"k": 1} and [s.data for s in segments] == [b"B", b"AC"]
    info.artifacts["inductor"] = ["a"]  # nothing the file lacks: not rewritten
    monkeypatch.setattr("torch.compiler.save_cache_artifacts", lambda: (b"A2", info))
    assert not artifacts.save()
