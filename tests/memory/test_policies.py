"""Plans applied to the tiny engine on CPU: streamed and offloaded engines give the resident engine's latents.

Not bitwise: the resident engine's weights are unaligned views of the safetensors mmap, the streamed ones sit in
256-byte-aligned buffers, and the CPU gemv sums in another order for aligned data (measured: 5e-7 on one adaLN
linear). So the check is within 1e-6 on latents of magnitude ~1.
"""

from __future__ import annotations

import pytest
import torch

from zimage.memory.planner import make_plan
from zimage.request import GenerateRequest

REQ = GenerateRequest(prompts=("a red fox in the snow",), width=256, height=256, steps=3, seed=7)


def latents(engine, request=REQ):
    cond, _ = engine.encode([request])
    out, _ = engine.denoise(cond, engine.noise(request.image_seeds(), request), request)
    return out


def plan(engine, streamed, text_resident, offloaded=True, tiled=False):
    s = engine.sizes
    return make_plan(s, 2**30, 256, 256, 1, streamed, text_resident, offloaded, tiled, False)


@pytest.fixture(scope="module")
def reference(own_engine):
    assert own_engine.policy.plan.kind == "resident"
    return latents(own_engine)


@pytest.mark.parametrize("streamed,text_resident,tiled", [(0, 1, False), (1, 1, False), (2, 0, True), (1, 2, False)])
def test_plans_give_resident_latents(own_engine, reference, streamed, text_resident, tiled):
    own_engine.prompts.clear_cache()
    own_engine.place(plan(own_engine, streamed, text_resident, tiled=tiled))
    policy = own_engine.policy
    assert policy.plan.transformer_streamed == streamed
    out = latents(own_engine)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    blocks, layers = own_engine.transformer.layers, own_engine.text_encoder.layers
    # streamed blocks' weights are views of their own host buffers between forwards, and moved bytes add up
    for i in policy.plan.streamed_blocks():
        w = next(blocks[i].attention.parameters())  # to_q, or to_qkv once fused by zimage.speed.fuse
        assert w.untyped_storage().data_ptr() == policy.transformer_streamer.packed[i].host.untyped_storage().data_ptr()
    tr_bytes = sum(p.nbytes for p in policy.transformer_streamer.packed.values()) if streamed else 0
    te_bytes = sum(p.nbytes for p in policy.text_streamer.packed.values()) if policy.text_streamer else 0
    assert policy.bytes_moved() >= tr_bytes * REQ.steps + te_bytes
    assert len(policy.plan.streamed_text_layers()) == len(layers) - text_resident
    own_engine.place(plan(own_engine, 0, len(layers), offloaded=False))  # back to resident


def test_cached_prompt_moves_no_text_bytes(own_engine, reference):
    own_engine.prompts.clear_cache()
    own_engine.place(plan(own_engine, 0, 0))
    latents(own_engine)  # encodes: every text layer streamed in
    moved = own_engine.policy.bytes_moved()
    assert moved > 0 and own_engine.prompts.cached(REQ.prompts[0])
    torch.testing.assert_close(latents(own_engine), reference, rtol=0, atol=1e-6)
    assert own_engine.policy.bytes_moved() == moved  # repeated prompt: the text encoder was not run
    assert own_engine.text_encoder.embed_tokens.weight.device.type == "cpu"
    own_engine.place(plan(own_engine, 0, 2, offloaded=False))


def test_streamed_image_and_tiled_decode(own_engine):
    own_engine.place(plan(own_engine, 0, 2, offloaded=False))
    ref = own_engine.generate(REQ).images[0].image
    own_engine.place(plan(own_engine, 2, 0, tiled=True))
    assert own_engine.policy.tiled_decode and own_engine.vae.tile_sample_min_size == 512
    got = own_engine.generate(REQ).images[0].image
    diff = max(abs(a - b) for a, b in zip(got.tobytes(), ref.tobytes()))
    assert diff <= 1  # uint8 pixels: at most one rounding step apart
    assert "stream" in own_engine.describe()["memory_plan"]
    own_engine.place(plan(own_engine, 0, 2, offloaded=False))


def test_the_engines_plan_on_cpu_is_resident_whatever_the_budget(tiny_folder):
    """A budget names GPU memory: on a CPU the engine keeps everything resident (home: the CPU itself)."""
    from zimage.engine.build import model_sizes_of, plan_memory, resolve_target
    from zimage.engine.config import EngineConfig
    from zimage.memory.planned import home
    from zimage.weights.check import check_model_folder

    config = EngineConfig(vram_budget_gib=0.001, device="cpu")
    target = resolve_target(config)
    plan = plan_memory(config, target, model_sizes_of(check_model_folder(tiny_folder), target, config))
    assert plan.kind == "resident" and home(plan, "transformer", target.device) == target.device
    assert "predicted peak" in plan.describe()
