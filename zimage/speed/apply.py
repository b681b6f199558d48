"""Speed modes, applied to placed networks. Each lever is switchable and measured (benchmarks/bench_speed.py).

- eager:   the transformer's own forward (zimage.models.z_image_step) with PyTorch's attention choice.
- compile: every transformer block compiled by inductor (regional compilation: one graph per block kind, reused by
           all 30 joint blocks), q/k/v and SwiGLU projections fused, cuDNN attention on Hopper; on CUDA the VAE
           decoder compiled (channels_last) and the text encoder replayed from CUDA graphs when it
           is wholly on the GPU (zimage.speed.text_graphs).
- auto:    compile on CUDA when the entrypoint will make many images (a server, a long prompts file); eager
           otherwise, so a one-image CLI run never pays for compilation (see README: Speed, for the figures).

`apply_speed` is called by the Engine after every placement (the first one and each re-placement: an out-of-memory
fallback, a LoRA change), with the placement's plan. It is idempotent and undoes what a new plan forbids: blocks
compiled under a resident plan run eager again once a plan streams them. Settings that inductor, dynamo and cuDNN
read process-wide are applied only inside `SpeedSetup.scoped()`, which the engine enters around a generation.
Compiled setups carry their precompiled functions (zimage.speed.precompiled: the blocks and the decoder compiled
ahead of time, loaded here while the engine loads) and their portable compile artifacts (zimage.speed.compile_cache:
loaded before those functions, or else inside the first `scoped()`); both are saved by `SpeedSetup.save_compiled()`,
which the engine calls after each generation.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from zimage.speed.modes import resolve_speed

log = logging.getLogger("zimage")

# Sizes and caption lengths vary between requests: dynamo may keep this many graphs per block before it gives up
# and runs the block eager (its default, 8, is exceeded by a server's mix of sizes and caption lengths).
RECOMPILE_LIMIT = 64


def compile_cache_dir() -> str:
    from zimage.weights.locate import zimage_cache

    return str(zimage_cache() / "inductor")


@contextlib.contextmanager
def inductor_cache_folder():
    """TORCHINDUCTOR_CACHE_DIR is zimage's folder inside, unless the user chose one; restored after. Inductor writes
    its default folder into os.environ the first time anything looks one up (importing torch._dynamo.utils does, so
    does torch.compile's first call): that value is inductor's default, not the user's choice, and is overridden
    too (then put back as it was)."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    chosen = before is not None and os.path.abspath(before) != _inductor_default_folder()
    try:
        if not chosen:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache_dir()
        yield
    finally:
        if not chosen:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


def _inductor_default_folder() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except Exception:  # noqa: BLE001 - another torch: every set value counts as the user's
        return None


@dataclass
class SpeedSetup:
    """What `apply_speed` set up: the mode that runs and what the prompt encoder should call."""

    mode: str  # "eager" | "compile"
    attention_backend: str  # zimage.models.z_image.ATTENTION_BACKENDS
    text_encoder: object  # the plain text encoder, or its CUDA-graph replay (zimage.speed.text_graphs)
    device: object = None  # torch.device the networks run on
    artifacts: object = None  # zimage.speed.compile_cache.CompileArtifacts: the portable compile cache, or None
    precompiled: object = None  # zimage.speed.precompiled.Precompiled: the blocks' and decoder's functions, or None

    @contextlib.contextmanager
    def scoped(self):
        """The process-wide settings compiled code needs, only while a generation runs (then restored): dynamo's
        recompile limit and inductor's cache folder (zimage's own, unless the user set TORCHINDUCTOR_CACHE_DIR).
        Eager mode changes nothing.
        The first compiled run hot-loads the portable compile artifacts first (zimage.speed.compile_cache), unless
        apply_speed did already (before preloading the precompiled functions)."""
        if self.mode != "compile":
            yield
            return
        import torch

        limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # cuDNN's per-shape algorithm search (cudnn.benchmark) is left as the caller has it: measured on an H200
        # (bench_vae_decode.py), the compiled decoder at 1024x1024 runs 34.5 ms without it and 34.6 ms with it,
        # and the search added 0.46 s to the first image of every process.
        with inductor_cache_folder(), torch._dynamo.config.patch(recompile_limit=limit):
            if self.artifacts is not None:
                self.artifacts.load()  # once: before the first compiled call, into the folder it compiles with
            yield

    def save_compiled(self) -> bool:
        """After a compiled run (the engine calls it when a generation finished): write the precompiled functions
        the run compiled (zimage.speed.precompiled) and the portable compile artifacts if the run compiled graphs
        the file does not hold yet (zimage.speed.compile_cache)."""
        wrote = self.precompiled.save() > 0 if self.precompiled is not None else False
        return (self.artifacts.save() if self.artifacts is not None else False) or wrote


def apply_speed(parts, mode: str, plan, expected_images: int | None = None, max_text_tokens: int = 512,
                compile_cache: bool = True) -> SpeedSetup:
    """Configure the placed networks `parts` (zimage.memory.policy.Parts) for `mode` under `plan`; `max_text_tokens`
    is the prompt encoder's limit (the largest text-graph bucket). `compile_cache`: load and save the portable
    compile artifacts (zimage.speed.compile_cache; ZIMAGE_COMPILE_CACHE=0 turns them off too)."""
    from zimage.models.z_image import NATIVE
    from zimage.speed.attention import choose_attention_backend, set_attention_backend
    from zimage.speed.text_graphs import graphed_text_encoder

    device, transformer = parts.device, parts.transformer
    concrete = resolve_speed(mode, device, expected_images)
    # Compile needs the transformer fully on the device; the text encoder's and the VAE's placement do not matter
    # (text-offload, tiled decode and fp8 storage plans compile too).
    resident = (plan is None or plan.transformer_streamed == 0) and all(
        p.device == device for p in transformer.parameters())
    if concrete == "compile" and not resident:
        # Streamed blocks swap their weights in forward hooks, which a compiled block would trace into its graph.
        log.warning("--speed compile is not combined with streamed transformer blocks yet; running eager")
        concrete = "eager"
    # Measured on an H200 at 1024x1024 (BENCHMARKS.md, forward variants): in eager, PyTorch's own SDPA choice and
    # separate projections are fastest (142 ms/forward; fused 144, cuDNN 145-150); compiled, fused projections
    # with cuDNN attention are (96.4 ms against 98.3 unfused).
    if concrete == "compile":
        backend = choose_attention_backend(device)
        # Fusing allocates each fused weight before freeing its parts: only under the all-resident bf16 plan (a
        # 16 GiB cap once ran out of memory there). fp8 plans ("resident+fp8") keep their separately scaled layers.
        if plan is None or plan.kind == "resident":
            from zimage.speed.fuse import fuse_block
            from zimage.speed.lora_wide import widen_lora_layers

            for block in transformer.blocks():
                fuse_block(block)
            widen_lora_layers(transformer)  # runtime LoRA slots: one GEMM when a batch uses one set
        compile_blocks(transformer, parts.vae, device)
    else:
        backend = NATIVE
        uncompile(transformer, parts.vae)  # blocks compiled under an earlier placement run eager again
    set_attention_backend(transformer, backend)
    # Compile mode: a new prompt's ~700 eager launches (~28 ms on an H200) become one graph replay. Only the prompt
    # encoder calls the replay; parts.text_encoder stays the module the memory policy places.
    text = graphed_text_encoder(parts.text_encoder, device, plan, max_text_tokens) if concrete == "compile" else None
    if text is not None:
        log.info("text encoder: CUDA graphs per prompt-length bucket, captured on first use")
    artifacts = precompiled = None
    if concrete == "compile":
        from zimage.speed import compile_cache as portable
        from zimage.speed import precompiled as ahead

        if portable.enabled(compile_cache):
            slot, key = portable.compile_key(transformer, parts.vae, device, {
                "mode": concrete, "attention": backend, "recompile_limit": RECOMPILE_LIMIT, "fullgraph": True,
                "fused": hasattr(transformer.blocks()[0].attention, "to_qkv"),
                "graphs": ["blocks"] + (["vae_decoder"] if device.type == "cuda" else [])})
            artifacts = portable.CompileArtifacts(slot, key)
            if ahead.enabled(compile_cache):
                precompiled = ahead.Precompiled(slot, key)
                ahead.install(transformer, parts.vae, device, precompiled)
                with inductor_cache_folder():  # loading writes code and kernels into inductor's folder
                    # The portable artifacts first: they carry Triton's autotuning results, which the preloaded
                    # kernels look up as they load (measured on an H200: loaded after them, the first image re-ran
                    # the autotuning, 3.5 s).
                    artifacts.load()
                    precompiled.preload()
    return SpeedSetup(concrete, backend, text if text is not None else parts.text_encoder, device, artifacts,
                      precompiled)


def compile_blocks(transformer, vae, device) -> None:
    """Compile every transformer block (and, on CUDA, the VAE decoder in channels_last). Compilation itself happens
    at the first call of each new shape, inside SpeedSetup.scoped()."""
    import torch

    with inductor_cache_folder():  # torch.compile's first call looks inductor's folder up (and sets it)
        for block in transformer.blocks():
            block.compile(fullgraph=True)
        if device.type == "cuda":
            vae.to(memory_format=torch.channels_last)  # NHWC: cuDNN's fast layout for bf16 convolutions
            vae.decoder.compile()  # fuses GroupNorm + SiLU around the convolutions
        folder = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    log.info("transformer blocks compiled (first image of each new size compiles; cache: %s)", folder)


def uncompile(transformer, vae) -> None:
    """Undo `compile_blocks`: nn.Module.compile keeps the compiled callable in `_compiled_call_impl`, and a module
    without one runs its plain forward (and its hooks) again."""
    for module in list(transformer.blocks()) + [vae.decoder]:
        module._compiled_call_impl = None


def is_compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None
