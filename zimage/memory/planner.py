"""Choosing the fastest memory plan that fits a VRAM budget. Pure arithmetic over byte counts (no torch).

Per phase, GPU bytes = resident weights + streaming buffers of that phase + that phase's activations:
    encode  (only for a prompt not in the cache) = W + 2 text layers (buffers) + text activations
    encode_image (img2img / inpainting only) = W + VAE encoder activations (full image, or one 512-px tile)
    denoise = W + 2 transformer blocks (buffers) + transformer activations
    decode  = W + VAE activations (full image, or one 512-px tile)
where W = resident transformer + resident text encoder + VAE (+ its encoder, once loaded). A plan fits when its peak plus a headroom (allocator
fragmentation, cuBLAS workspaces) is within the budget.

Cost model, used only to rank plans that fit: seconds added per image = transformer bytes streamed per image / bus
bandwidth + text-encoder bytes streamed per new prompt / bandwidth + a fixed price for tiled decode. fp8 plans
(transformer matrices at 1 byte) are made only when the user asks for fp8 (it is lossy), and then all plans are.
"""

from __future__ import annotations

from zimage.errors import UsageError
from zimage.memory.plan import GIB, MemoryPlan, spread
from zimage.memory.sizes import ModelSizes

MIB = 2**20
HEADROOM_BYTES = 512 * MIB  # kept free: allocator fragmentation, cuBLAS/cuDNN workspaces
HEADROOM_FRACTION = 0.03  # ... plus 3% of the budget
STREAM_BUFFERS = 2  # GPU buffers per streamed network: block k computes while block k+1 is copied in
TILE_PX = 512  # tiled decode: tile side in pixels (zimage.memory.planned sets it on the VAE)
FIXED_ACTIVATIONS = 256 * MIB  # RoPE tables, timestep embeddings, small temporaries
BUS_BYTES_PER_S = 50 * GIB  # pinned host -> device (51.5 GiB/s measured on an H200 box); for ranking only
TILED_DECODE_S = 0.1  # what tiled decode is assumed to add per image (overlap re-decoded), for ranking only
STEPS = 9  # transformer forwards per image assumed when ranking (Turbo default)


def transformer_activations(s: ModelSizes, width: int, height: int, batch: int) -> int:
    """Peak activation bytes of one forward: tokens x (12 dim + 6 ffn) elements (residual, qkv, attention out,
    norms in fp32, the SwiGLU hidden pair), caption tokens counted at their maximum."""
    tokens = (width // 16) * (height // 16) + s.max_text_tokens  # patch 2 on latents of /8: one token per 16 px
    return batch * tokens * (12 * s.dim + 6 * s.ffn) * s.dtype_bytes + FIXED_ACTIVATIONS


def text_activations(s: ModelSizes, prompts: int) -> int:
    return prompts * s.max_text_tokens * (8 * s.text_hidden + 4 * s.text_ffn) * s.dtype_bytes


def vae_activations(width: int, height: int, tiled: bool, dtype_bytes: int = 2) -> int:
    """Decode of one image (the engine decodes one at a time): ~1280 elements per output pixel at its peak (the
    last up-blocks run at full resolution with 128-256 channels), plus the (3, H, W) float32 output and tiles."""
    px = min(width, TILE_PX) * min(height, TILE_PX) if tiled else width * height
    return px * 1280 * dtype_bytes + width * height * 3 * 4 * 2


def headroom(budget: int) -> int:
    return HEADROOM_BYTES + int(HEADROOM_FRACTION * budget)


def make_plan(s: ModelSizes, budget: int, width: int, height: int, batch: int, streamed: int, text_resident: int,
              text_offloaded: bool, tiled: bool, fp8: bool) -> MemoryPlan:
    """The plan with these choices and its predicted bytes (it may not fit: see `fits`)."""
    tr, te = s.transformer, s.text_encoder
    blocks = tr.blocks_fp8 if fp8 else tr.blocks
    rest = tr.rest_fp8 if fp8 else tr.rest
    on_host = set(spread(streamed, len(blocks)))
    tr_gpu = rest + sum(b for i, b in enumerate(blocks) if i not in on_host)
    tr_moved = sum(blocks[i] for i in on_host)
    text_on_host = set(spread(len(te.blocks) - text_resident, len(te.blocks)))
    te_gpu = (te.rest - (s.text_embeddings if text_offloaded else 0)) + sum(
        b for i, b in enumerate(te.blocks) if i not in text_on_host)
    te_moved = sum(te.blocks[i] for i in text_on_host)
    weights = tr_gpu + te_gpu + s.vae.total + (s.vae_encoder.total if s.vae_encoder else 0)
    encode = weights + (STREAM_BUFFERS * te.block if text_on_host else 0) + text_activations(s, batch)
    denoise = weights + (STREAM_BUFFERS * max(blocks) if on_host else 0) + transformer_activations(s, width, height, batch)
    decode = weights + vae_activations(width, height, tiled, s.dtype_bytes)
    phases = (("encode", encode), ("denoise", denoise), ("decode", decode))
    if s.vae_encoder:  # the encoder's activations: at most the decoder's (the same blocks, mirrored), one image
        phases = (("encode", encode), ("encode_image", decode), ("denoise", denoise), ("decode", decode))
    return MemoryPlan(
        transformer_blocks=len(blocks), transformer_streamed=streamed, text_layers=len(te.blocks),
        text_resident_layers=text_resident, text_offloaded=text_offloaded, weight_dtype="fp8" if fp8 else "bf16",
        tiled_decode=tiled, peak_bytes=max(b for _, b in phases), phase_peaks=phases,
        moved_per_image=tr_moved * STEPS, moved_per_new_prompt=te_moved, budget_bytes=budget,
        width=width, height=height, batch=batch, image_encoder=s.vae_encoder is not None,
    )


def fits(plan: MemoryPlan) -> bool:
    return plan.peak_bytes + headroom(plan.budget_bytes) <= plan.budget_bytes


def cost_s(plan: MemoryPlan) -> float:
    """Seconds a plan is assumed to add per image (new prompt) over the resident plan; for ranking."""
    return ((plan.moved_per_image + plan.moved_per_new_prompt) / BUS_BYTES_PER_S
            + (TILED_DECODE_S if plan.tiled_decode else 0.0))


def candidates(s: ModelSizes, budget: int, width: int, height: int, batch: int, fp8: bool):
    """Every plan worth considering at one weight dtype: all resident, then for each number of streamed
    transformer blocks and each decode mode, the offloaded text encoder with as many layers resident as fit."""
    n_blocks, n_text = len(s.transformer.blocks), len(s.text_encoder.blocks)
    for tiled in (False, True):
        yield make_plan(s, budget, width, height, batch, 0, n_text, False, tiled, fp8)
        for streamed in range(n_blocks + 1):
            best = None
            for text_resident in range(n_text, -1, -1):  # the most resident layers that fit
                plan = make_plan(s, budget, width, height, batch, streamed, text_resident, True, tiled, fp8)
                if fits(plan):
                    best = plan
                    break
            if best is not None:
                yield best
                break  # more streamed blocks only cost more (at this decode mode)
        else:
            yield make_plan(s, budget, width, height, batch, n_blocks, 0, True, tiled, fp8)  # the leanest


def leanest_plan(s: ModelSizes, width: int, height: int, batch: int = 1, fp8: bool = False,
                 budget: int = 0) -> MemoryPlan:
    """Everything that can be streamed is, decode is tiled (with fp8 storage if asked for)."""
    return make_plan(s, budget, width, height, batch, len(s.transformer.blocks), 0, True, True, fp8)


def minimum_budget(plan: MemoryPlan) -> int:
    """The smallest budget in which `plan` fits (solves peak + headroom(b) <= b for b)."""
    b = int((plan.peak_bytes + HEADROOM_BYTES) / (1 - HEADROOM_FRACTION)) + 1
    while plan.peak_bytes + headroom(b - 1) <= b - 1:  # int() in headroom() leaves a few bytes of slack
        b -= 1
    return b


def choose_plan(budget_bytes: int, sizes: ModelSizes, width: int = 1024, height: int = 1024, batch: int = 1,
                fp8: bool = False) -> MemoryPlan:
    """The fastest plan that fits `budget_bytes` of GPU memory; UsageError (naming the minimum) if none does.
    `fp8`: plans with the transformer's matrices stored in fp8 (the user's lossy choice), else bf16 ones."""
    if budget_bytes <= 0:
        raise UsageError(f"the VRAM budget must be positive, got {budget_bytes / GIB:.2f} GiB", param="vram_budget")
    fitting = [p for p in candidates(sizes, budget_bytes, width, height, batch, fp8) if fits(p)]
    if fitting:
        # Fastest first; ties (e.g. zero cost) go to the simpler plan: fewer streamed, untiled, not offloaded.
        return min(fitting, key=lambda p: (cost_s(p), p.transformer_streamed, p.tiled_decode, p.text_offloaded,
                                           -p.text_resident_layers))
    leanest = leanest_plan(sizes, width, height, batch, fp8)
    need = minimum_budget(leanest)
    raise UsageError(
        f"a VRAM budget of {budget_bytes / GIB:.2f} GiB is too small for {width}x{height} (batch {batch}): "
        f"the leanest plan ({leanest.kind}) needs at least {need / GIB:.2f} GiB; "
        "give a larger --vram-budget or a smaller size",
        param="vram_budget",
    )


def same_placement(plan: MemoryPlan, sizes: ModelSizes, width: int, height: int, batch: int) -> MemoryPlan:
    """`plan`'s placement (streamed blocks, text layers, decode mode, weight dtype, budget) at another image size and
    batch, with its predicted bytes there."""
    return make_plan(sizes, plan.budget_bytes, width, height, batch, plan.transformer_streamed,
                     plan.text_resident_layers, plan.text_offloaded, plan.tiled_decode, plan.weight_dtype == "fp8")


def largest_batch(plan: MemoryPlan, sizes: ModelSizes, width: int, height: int, limit: int) -> int:
    """The most rows through the transformer per batch (images, x2 with CFG), up to `limit`, that `plan`'s placement
    fits within its budget at width x height (at least 1: one image that does not fit is the out-of-memory
    recovery's to handle)."""
    best = 1
    for batch in range(2, limit + 1):
        if not fits(same_placement(plan, sizes, width, height, batch)):
            break
        best = batch
    return best
