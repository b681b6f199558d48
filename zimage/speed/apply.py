"""Speed modes, applied to a loaded engine. Each lever is switchable and measured (benchmarks/bench_speed.py).

- eager:   the fast step function (zimage.speed.fast_transformer) with the best attention kernel for the GPU.
- compile: eager + every transformer block compiled by inductor (regional compilation: one graph per block kind,
           reused by all 30 joint blocks), compiled artifacts kept on disk (zimage cache) so that a second process
           loads them instead of compiling; cuDNN autotuning for the VAE's convolutions; the text encoder replayed
           from CUDA graphs when it is wholly on the GPU (zimage.speed.text_graphs).
- auto:    compile on CUDA when the entrypoint will make many images (a server, a long prompts file); eager
           otherwise, so a one-image CLI run never pays for compilation (see README: Speed, for the figures).
"""

from __future__ import annotations

import logging
import os

from zimage.engine.config import SPEED_CHOICES
from zimage.errors import UsageError

log = logging.getLogger("zimage")

# Images after which compiling pays for itself in one process; from BENCHMARKS.md (compile cost with a warm
# on-disk cache divided by the per-image saving). Refreshed when the benchmark is.
# H200 (BENCHMARKS.md): a compiling process reaches its first image ~13.5 s later than an eager one even with the
# on-disk cache (20.1 s against 6.9 s, bench_compile), then saves 0.20 s per image (0.934 s against eager's 1.134 s
# with the fused RMSNorm): ~65 images.
COMPILE_BREAK_EVEN_IMAGES = 65


def resolve_speed(mode: str, device, expected_images: int | None) -> str:
    """The concrete mode ('eager' | 'compile') for `mode` on `device`; expected_images None means 'many'."""
    if mode not in SPEED_CHOICES:
        raise UsageError(f"unknown speed mode {mode!r}; choose one of {', '.join(SPEED_CHOICES)}", param="speed")
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "eager"  # inductor's CPU code is not worth its compile time for a 6B model on a CPU
    if expected_images is not None and expected_images < COMPILE_BREAK_EVEN_IMAGES:
        return "eager"
    return "compile"


def compile_cache_dir() -> str:
    from zimage.weights.locate import zimage_cache

    return str(zimage_cache() / "inductor")


def apply_speed(engine, mode: str, expected_images: int | None = None) -> str:
    """Configure `engine` for `mode`; returns the concrete mode applied."""
    from zimage.speed.attention import choose_attention_backend

    concrete = resolve_speed(mode, engine.device, expected_images)
    plan = getattr(engine.policy, "plan", None)
    # Compile needs the transformer fully on the device; the text encoder's and the VAE's placement do not matter
    # (text-offload, tiled decode and fp8 storage plans compile too).
    resident = (plan is None or plan.transformer_streamed == 0) and all(
        p.device == engine.device for p in engine.transformer.parameters())
    if concrete == "compile" and not resident:
        # Streamed blocks swap their weights in forward hooks, which a compiled block would trace into its graph.
        log.warning("--speed compile is not combined with streamed transformer blocks yet; running eager")
        concrete = "eager"
    # Measured on an H200 at 1024x1024 (BENCHMARKS.md, forward variants): in eager, PyTorch's own SDPA choice and
    # separate projections are fastest (142 ms/forward; fused 144, cuDNN 145-150); compiled, fused projections
    # with cuDNN attention are (96.4 ms against 98.3 unfused).
    if concrete == "compile":
        engine.fast.set_attention_backend(choose_attention_backend(engine.device))
        # Fusing allocates each fused weight before freeing its parts: only under the all-resident bf16 plan (a
        # 16 GiB cap once ran out of memory there). fp8 plans ("resident+fp8") keep their separately scaled layers.
        if plan is None or plan.kind == "resident":
            from zimage.speed.fuse import fuse_block

            for block in engine.fast.blocks():
                fuse_block(block)
        compile_blocks(engine)
    else:
        engine.fast.set_attention_backend("native")
    # Compile mode: a new prompt's ~700 eager launches (~28 ms on an H200) become one graph replay. Only
    # engine.prompts uses the wrapper; engine.text_encoder stays the module the memory policy places. In eager mode
    # this only undoes a previous install (a plain module is left as it is).
    from zimage.speed.text_graphs import install_text_graphs

    if install_text_graphs(engine, concrete == "compile"):
        log.info("text encoder: CUDA graphs per prompt-length bucket, captured on first use")
    return concrete


def compile_blocks(engine) -> None:
    import torch

    # Inductor reads its cache location when it first compiles; keep ours unless the user chose one.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", compile_cache_dir())
    # Sizes and caption lengths vary between requests: allow a graph per shape before going dynamic.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in engine.fast.blocks():
        block.compile(fullgraph=True)
    if engine.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # VAE convolutions: pick the fastest algorithm per shape, once
        engine.vae.to(memory_format=torch.channels_last)  # NHWC: cuDNN's fast layout for bf16 convolutions
        engine.vae.decoder.compile()  # fuses GroupNorm + SiLU around the convolutions
    log.info("transformer blocks compiled (first image of each new size compiles; cache: %s)",
             os.environ["TORCHINDUCTOR_CACHE_DIR"])
