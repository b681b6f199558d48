"""Engine.denoise starts from the caller's latents at any step of the schedule (what img2img needs): resuming from
the latents a full run had after step k gives the full run's result."""

from __future__ import annotations

import pytest
import torch

from zimage.request import GenerateRequest

REQ = GenerateRequest(prompts=("a red fox in the snow",), width=256, height=256, steps=4, seed=5)


def test_resuming_at_step_k_equals_the_full_run(engine):
    cond, _ = engine.encode([REQ])
    seen = {}

    def record(progress):
        seen[progress.step] = progress.latents.clone()

    full, _ = engine.denoise(cond, engine.noise(REQ.image_seeds(), REQ), REQ, on_progress=record)
    for k in (1, 2, 3):
        steps = []
        resumed, index = engine.denoise(cond, seen[k], REQ, on_progress=lambda p: steps.append((p.step, p.total)),
                                        start=k)
        assert index == [0]
        assert steps == [(i, REQ.steps - k) for i in range(1, REQ.steps - k + 1)]  # only the steps that ran
        torch.testing.assert_close(resumed, full, rtol=0, atol=1e-6)
    assert (seen[1] - full).abs().max() > 0.1  # the intermediate latents really differ from the result


def test_a_start_outside_the_schedule_is_refused(engine):
    cond, _ = engine.encode([REQ])
    noise = engine.noise(REQ.image_seeds(), REQ)
    with pytest.raises(ValueError, match="start step 4 outside 0..3"):
        engine.denoise(cond, noise, REQ, start=4)
