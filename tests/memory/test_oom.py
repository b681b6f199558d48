"""Out-of-memory recovery, with the error injected into the transformer's forward on CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from zimage.memory.oom import OutOfMemory, leaner_plan, switch_plan
from zimage.memory.planner import make_plan
from zimage.request import GenerateRequest

REQ = GenerateRequest(prompts=("a lighthouse at night",), width=256, height=256, steps=2, seed=3)


@pytest.fixture
def resident(own_engine):
    s = own_engine.policy.sizes
    switch_plan(own_engine, make_plan(s, 2**30, 256, 256, 1, 0, len(s.text_encoder.blocks), False, False, False))
    yield own_engine
    switch_plan(own_engine, make_plan(s, 2**30, 256, 256, 1, 0, len(s.text_encoder.blocks), False, False, False))


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
    s = own_engine.policy.sizes
    leanest = make_plan(s, 2**30, 256, 256, 1, len(s.transformer.blocks), 0, True, True, False)
    assert leaner_plan(leanest, s, 256, 256, 1) is None
    switch_plan(own_engine, leanest)
    fail(monkeypatch, own_engine, 1)
    try:
        with pytest.raises(OutOfMemory, match="leanest plan"):
            own_engine.generate(REQ)
    finally:
        switch_plan(own_engine, make_plan(s, 2**30, 256, 256, 1, 0, len(s.text_encoder.blocks), False, False, False))


def test_other_errors_pass_through(resident, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("not memory")

    monkeypatch.setattr(resident.transformer.layers[0], "forward", broken)
    with pytest.raises(RuntimeError, match="not memory"):
        resident.generate(REQ)
    assert resident.policy.plan.kind == "resident"
