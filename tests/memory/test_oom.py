"""Out-of-memory recovery, with the error injected into the transformer's forward on CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from zimage.memory.oom import OutOfMemory, leaner_plan
from zimage.memory.planner import make_plan
from zimage.request import GenerateRequest

REQ = GenerateRequest(prompts=("a lighthouse at night",), width=256, height=256, steps=2, seed=3)


@pytest.fixture
def resident(own_engine):
    s = own_engine.sizes
    own_engine.place(make_plan(s, 2**30, 256, 256, 1, 0, len(s.text_encoder.blocks), False, False, False))
    yield own_engine
    own_engine.place(make_plan(s, 2**30, 256, 256, 1, 0, len(s.text_encoder.blocks), False, False, False))


def fail(monkeypatch, engine, times):
    calls = {"n": 0}
    block = engine.transformer.layers[0]  # every forward path (reference or zimage's fast one) calls the blocks
    forward = block.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(block, "forward", flaky)
    return calls


def test_oom_once_switches_to_a_leaner_plan_and_retries(resident, monkeypatch, caplog):
    expected = resident.generate(REQ).images[0].image
    before = resident.policy.plan
    calls = fail(monkeypatch, resident, 1)
    with caplog.at_level(logging.WARNING, logger="zimage"):
        result = resident.generate(REQ)
    after = resident.policy.plan
    assert calls["n"] == 1 + REQ.steps  # one failed forward, then the whole retry
    assert after.peak_bytes < before.peak_bytes and after.kind != "resident"
    assert any("out of GPU memory" in w and after.kind in w for w in result.warnings)
    assert any("leaner plan" in r.getMessage() for r in caplog.records)
    got = result.images[0].image
    assert max(abs(a - b) for a, b in zip(got.tobytes(), expected.tobytes())) <= 1  # the same image


def test_oom_twice_is_a_clear_error_and_the_engine_stays_usable(resident, monkeypatch):
    fail(monkeypatch, resident, 2)
    with pytest.raises(OutOfMemory, match="twice") as e:
        resident.generate(REQ)
    assert e.value.exit_code == 1 and "256x256" in str(e.value)
    assert resident.generate(REQ).images  # the third forward on works: the engine is fine


def test_no_leaner_plan_under_the_leanest(own_engine, monkeypatch):
    s = own_engine.sizes
    leanest = make_plan(s, 2**30, 256, 256, 1, len(s.transformer.blocks), 0, True, True, False)
    assert leaner_plan(leanest, s, 256, 256, 1) is None
    own_engine.place(leanest)
    fail(monkeypatch, own_engine, 1)
    try:
        with pytest.raises(OutOfMemory, match="leanest plan"):
            own_engine.generate(REQ)
    finally:
        own_engine.place(make_plan(s, 2**30, 256, 256, 1, 0, len(s.text_encoder.blocks), False, False, False))


def test_other_errors_pass_through(resident, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("not memory")

    monkeypatch.setattr(resident.transformer.layers[0], "forward", broken)
    with pytest.raises(RuntimeError, match="not memory"):
        resident.generate(REQ)
    assert resident.policy.plan.kind == "resident"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_cuda_oom_under_a_cap_is_a_clear_error_frees_what_it_took_and_leaves_the_engine_usable(tiny_folder):
    """Forced for real: a per-process cap just above the loaded weights leaves no room for any plan's activations."""
    from zimage.engine.config import EngineConfig
    from zimage.engine.engine import Engine

    engine = Engine.load(EngineConfig(model=str(tiny_folder), device="cuda", dtype="bf16", speed="eager"))
    req = GenerateRequest(prompts=("a lighthouse at night",), width=1024, height=1024, steps=2, seed=3)
    expected = engine.generate(req).images[0].image
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((weights + 2**20) / total)
    try:
        with pytest.raises(OutOfMemory, match="1024x1024"):
            engine.generate(req)
        assert torch.cuda.memory_allocated() <= weights  # what the failed attempts took is freed
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    got = engine.generate(req).images[0].image  # under the leaner plan it fell back to (maybe a tiled decode)
    assert got.size == expected.size == (1024, 1024)


def test_a_compiled_engine_falls_back_to_a_streamed_plan_and_generates_eager(tiny_folder, caplog):
    """Compile and streamed blocks do not mix (the streamer's weight-swapping hooks would be traced into the block
    graphs): the OOM fallback goes through Engine.place, which re-applies speed for the new plan, so the compiled
    blocks run eager again under the streamed plan, and the image is the one the compiled engine made."""
    from zimage.engine.config import EngineConfig
    from zimage.engine.engine import Engine
    from zimage.speed.apply import is_compiled

    engine = Engine.load(EngineConfig(model=str(tiny_folder), device="cpu", dtype="fp32", speed="compile"))
    s = engine.sizes
    # Text encoder wholly streamed and a tiled decode: the only leaner plan left streams transformer blocks.
    engine.place(make_plan(s, 2**30, 256, 256, 1, 0, 0, True, True, False))
    assert engine.speed == "compile" and all(is_compiled(b) for b in engine.transformer.blocks())
    expected = engine.generate(REQ).images[0].image
    calls = {"n": 0}
    real = engine.prompts.encode

    def oom_once(prompts):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(prompts)

    engine.prompts.clear_cache()
    engine.prompts.encode = oom_once
    with caplog.at_level(logging.WARNING, logger="zimage"):
        result = engine.generate(REQ)
    assert engine.policy.plan.transformer_streamed > 0
    assert engine.speed == "eager" and not any(is_compiled(b) for b in engine.transformer.blocks())
    assert "not combined with streamed transformer blocks" in caplog.text
    got = result.images[0].image
    assert max(abs(a - b) for a, b in zip(got.tobytes(), expected.tobytes())) <= 1
