"""Precompiled functions (zimage.speed.precompiled) on CPU with the tiny model: a first compiled process compiles
the transformer blocks ahead of time and saves one function per call family (kind and shape); a second process
loads them while it loads and makes the same image without dynamo tracing anything. A function whose guards refuse a
call, a module that does not qualify, a call outside inference mode, a kind at MAX_SHAPES, a stale key or a corrupt
file fall back to torch.compile's path.

The children have their own zimage cache and no TORCHINDUCTOR_CACHE_DIR, so nothing compiled by other tests helps.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zimage.speed import compile_cache, precompiled

ROOT = Path(__file__).resolve().parents[1]
SIZE = (256, 256)

CHILD = r"""
import hashlib, json, sys
from torch._dynamo.utils import counters
from zimage.engine.engine import Engine
from zimage.request import GenerateRequest

engine = Engine.load(model=sys.argv[1], device="cpu", dtype="fp32", speed="compile")
store = engine.speed_setup.precompiled
loaded_at_load = dict(store.status)
artifacts_at_load = engine.speed_setup.artifacts.status
w, h = json.loads(sys.argv[2])
result = engine.generate(GenerateRequest(prompts=("a lighthouse at dusk",), width=w, height=h, steps=2, seed=5))
pixels = hashlib.sha256(result.images[0].image.tobytes()).hexdigest()
calls = [b._compiled_call_impl.calls for b in engine.parts.transformer.blocks()]
print(json.dumps({"folder": str(store.folder), "loaded_at_load": loaded_at_load, "status": store.status,
                  "artifacts_at_load": artifacts_at_load,
                  "calls": {k: sum(c[k] for c in calls) for k in calls[0]}, "pixels": pixels,
                  "graphs": counters["stats"].get("unique_graphs", 0)}))
"""


def run_child(model: Path, cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", precompiled.ENV)}
    env.update(ZIMAGE_CACHE=str(cache), PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), json.dumps(SIZE)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def first(tiny_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("pc-cache")
    return run_child(tiny_folder, cache), cache


KINDS = {"block-mod-nomask", "block-plain-nomask"}  # joint + noise-refiner blocks; the caption refiner


def test_a_first_process_compiles_ahead_and_saves_one_function_per_family(first):
    res, _ = first
    assert res["loaded_at_load"] == {}  # nothing there yet
    assert {f.partition(".")[0] for f in res["status"]} == KINDS and set(res["status"].values()) == {"saved"}
    assert res["calls"]["fallback"] == 0 and res["calls"]["precompiled"] > 0
    folder = Path(res["folder"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(f + ".zaot" for f in res["status"])
    # static shapes: the modulated kind at the noise refiner's image tokens and the joint blocks' image + caption
    # tokens, the caption refiner's kind at the caption's
    assert sorted(f.partition(".")[0] for f in res["status"]) == ["block-mod-nomask"] * 2 + ["block-plain-nomask"]
    family = next(f for f in res["status"] if f.startswith("block-mod-nomask."))
    key, segments = compile_cache.read_file(folder / (family + ".zaot"))
    assert key["precompiled"] == family and key["source"] == compile_cache.source_digest()
    assert len(segments) == 1


def tokens(res) -> int:
    """A token count the first process precompiled the modulated blocks at."""
    family = next(f for f in res["status"] if f.startswith("block-mod-nomask."))
    return int(family.rpartition("-l")[2])


def test_a_second_process_loads_them_and_traces_nothing(first, tiny_folder):
    res, cache = first
    second = run_child(tiny_folder, cache)
    assert second["loaded_at_load"] == {f: "loaded" for f in res["status"]}  # Engine.load preloads them
    # after the portable artifacts (they hold the kernels' autotuning results, which loading a function looks up)
    assert res["artifacts_at_load"] == "absent" and second["artifacts_at_load"] == "loaded"
    assert second["graphs"] == 0  # dynamo traced no frame
    assert second["calls"] == res["calls"] and second["calls"]["fallback"] == 0
    assert second["pixels"] == res["pixels"]  # the same compiled code: the same image, bit for bit


@pytest.fixture
def tiny_block(engine, first):
    """A modulated block of the tiny model, as compile mode prepares it (fused), and inputs for it at the token
    count the first process saved a function for."""
    import copy

    from zimage.speed.fuse import fuse_block

    block = copy.deepcopy(engine.transformer.layers[0])
    fuse_block(block)
    g = torch.Generator().manual_seed(0)
    dim, hd = block.attention_norm1.weight.shape[0], block.attention.norm_q.weight.shape[0]
    with torch.inference_mode():  # inference tensors, as the engine's (the functions' guards check that too)
        n = tokens(first[0])
        args = (torch.randn(1, n, dim, generator=g), None, torch.randn(1, n, hd // 2, 2, generator=g),
                torch.randn(1, block.adaLN_modulation[0].in_features, generator=g))
    return block, args


@pytest.fixture
def child_threads(first):
    """torch's thread count as the first process had it (this process runs with 1: conftest); the functions'
    guards check it."""
    key, _ = compile_cache.read_file(next(Path(first[0]["folder"]).glob("block-mod-nomask.*")))
    before = torch.get_num_threads()
    torch.set_num_threads(key["threads"])
    yield key["threads"]
    torch.set_num_threads(before)


def _store(first, tmp_path, threads: int):
    """A store reading the first process's files (a copy), under the key they were saved with, at `threads`."""
    import shutil

    res, _ = first
    folder = tmp_path / "artifacts"
    shutil.copytree(Path(res["folder"]), folder / "slot")
    saved, _ = compile_cache.read_file(next((folder / "slot").glob("block-mod-nomask.*")))
    store = precompiled.Precompiled("slot", {k: v for k, v in saved.items() if k not in ("precompiled", "threads")},
                                    folder)
    store.threads = threads
    return store


def _call(store, block, fallback):
    return precompiled.PrecompiledCall(block, store, precompiled._block_forward, precompiled.block_family, fallback,
                                       precompiled.BLOCK_CLASSES)


def test_a_call_its_guards_refuse_runs_torch_compiles_path(first, tmp_path, tiny_block, monkeypatch, caplog,
                                                           child_threads):
    block, args = tiny_block
    store = _store(first, tmp_path, child_threads)
    monkeypatch.setattr(store, "_compile", lambda *a: pytest.fail("a saved family must not compile again"))
    call = _call(store, block, lambda *a: block.forward(*a))
    with torch.inference_mode():
        out = call(*args)  # fp32, batch 1, no mask: the saved function
        family = "block-mod-nomask.b1-l%d" % tokens(first[0])
        assert call.calls == {"precompiled": 1, "fallback": 0} and store.status[family] == "loaded"
        torch.testing.assert_close(out, block.forward(*args), rtol=0, atol=1e-4)
        block.double()  # the same family, a dtype its guards do not accept
        with caplog.at_level(logging.INFO, logger="zimage"):
            out = call(*(a.double() if a is not None else None for a in args))
        assert call.calls == {"precompiled": 1, "fallback": 1} and out.dtype == torch.float64
        assert family + ": its guards refuse a call" in caplog.text
    with torch.no_grad():  # not inference mode: autograd-visible tensors, torch.compile's path
        call(*(a.double() if a is not None else None for a in args))
    assert call.calls["fallback"] == 2


def test_modules_with_hooks_or_other_layers_do_not_qualify(first, tmp_path, tiny_block, monkeypatch, child_threads):
    """Decided at the first call, after the engine's own hooks (fp16's overflow guard is added after apply_speed):
    the function calls forward directly and would skip a hook."""
    from torch import nn

    block, args = tiny_block
    assert precompiled.qualifies(block, precompiled.BLOCK_CLASSES)
    store = _store(first, tmp_path, child_threads)
    call = _call(store, block, lambda *a: block.forward(*a))
    handle = block.attention.register_forward_hook(lambda *a: None)  # after install, before the first call
    with torch.inference_mode():
        call(*args)
    assert call.eligible is False and call.calls == {"precompiled": 0, "fallback": 1}
    handle.remove()
    assert precompiled.qualifies(block, precompiled.BLOCK_CLASSES)
    block.attention.to_out[0] = nn.Identity()  # e.g. a runtime LoRA layer or an fp8 linear in its place
    assert not precompiled.qualifies(block, precompiled.BLOCK_CLASSES)


@pytest.mark.parametrize("damage", ["stale", "corrupt"])
def test_a_stale_or_corrupt_file_is_compiled_again(first, tmp_path, tiny_block, monkeypatch, caplog, damage,
                                                   child_threads):
    """stale: the files were made under another torch thread count (another machine), which every call would
    fail; corrupt: a flipped byte."""
    block, args = tiny_block
    store = _store(first, tmp_path, child_threads + 1 if damage == "stale" else child_threads)
    family = "block-mod-nomask.b1-l%d" % tokens(first[0])
    path = store.path(family)
    if damage == "corrupt":
        blob = path.read_bytes()
        path.write_bytes(blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:])
    compiled = []
    monkeypatch.setattr(store, "_compile", lambda family, *a: compiled.append(family))  # returns None: fall back
    with caplog.at_level(logging.INFO, logger="zimage"), torch.inference_mode():
        # stale: none loads; corrupt: the other families' files are whole
        assert store.preload() == (0 if damage == "stale" else len(first[0]["status"]) - 1)
        out = _call(store, block, lambda *a: block.forward(*a))(*args)
    assert store.status[family] == damage and compiled == [family]
    assert ("made for another build" if damage == "stale" else "is unreadable") in caplog.text
    torch.testing.assert_close(out, block.forward(*args), rtol=0, atol=0)


def test_a_kind_keeps_at_most_max_shapes_functions(tmp_path, monkeypatch, caplog):
    """Shapes past MAX_SHAPES of one kind run torch.compile's path (which goes dynamic itself) instead of compiling
    one more static function each; other kinds are not affected."""
    store = precompiled.Precompiled("slot", {"k": 1}, tmp_path)

    class Fn:
        def disable_guard_check(self):
            pass

    compiled = []
    monkeypatch.setattr(store, "_compile", lambda family, *a: compiled.append(family) or Fn())
    shapes = [f"b1-l{n}" for n in range(precompiled.MAX_SHAPES + 2)]
    with caplog.at_level(logging.INFO, logger="zimage"):
        got = [store.function("block-mod-nomask", s, None, None, ()) for s in shapes]
    assert all(got[:precompiled.MAX_SHAPES]) and got[precompiled.MAX_SHAPES:] == [None, None]
    assert len(compiled) == precompiled.MAX_SHAPES and "torch.compile runs other shapes" in caplog.text
    assert store.function("block-mod-nomask", shapes[0], None, None, ()) is got[0]  # known shapes still served
    assert store.function("decoder", "b1-32x32", None, None, ()) is not None


def test_it_can_be_turned_off(tiny_folder, monkeypatch):
    from zimage.engine.engine import Engine
    from zimage.speed import apply as speed_apply

    monkeypatch.setattr(speed_apply, "compile_blocks", lambda *a: None)  # the choice is under test, not inductor
    monkeypatch.setattr(precompiled, "install", lambda *a: None)
    monkeypatch.setenv(precompiled.ENV, "1")  # (conftest turns them off for other tests)
    assert Engine.load(model=str(tiny_folder), speed="compile").speed_setup.precompiled is not None
    monkeypatch.setenv(precompiled.ENV, "0")
    assert Engine.load(model=str(tiny_folder), speed="compile").speed_setup.precompiled is None
    monkeypatch.delenv(precompiled.ENV)
    assert Engine.load(model=str(tiny_folder), speed="compile", compile_cache=False).speed_setup.precompiled is None
