"""fp16 on GPUs without bf16: Z-Image's activations exceed fp16's range (65504) and turn into inf/NaN, which gives
black images (Tongyi-MAI/Z-Image issue 14). As ComfyUI and SD.Next do, we clamp the residual-branch outputs
(attention, SwiGLU product, feed-forward) back into range. Installed as forward hooks only when the transformer
runs in fp16; bf16/fp32 are untouched. The engine also refuses to write an image from non-finite latents.
"""

from __future__ import annotations

FP16_MAX = 65504.0


def _clamp(t):
    import torch

    return torch.nan_to_num(t, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


def install_fp16_guard(transformer) -> int:
    """Add clamping hooks to every block of an fp16 transformer; returns the number of hooks added. Blocks already
    guarded are skipped (the engine calls this after every placement; fusion replaces the feed-forward module, whose
    new instance then gets its hooks)."""
    n = 0
    for block in list(transformer.noise_refiner) + list(transformer.context_refiner) + list(transformer.layers):
        for module, pre in ((block.attention, False), (block.feed_forward, False), (block.feed_forward.w2, True)):
            if getattr(module, "_zimage_fp16_guard", False):
                continue
            if pre:  # w2's input is silu(w1 x) * w3 x, the product that overflows first
                module.register_forward_pre_hook(lambda m, args: (_clamp(args[0]),) + tuple(args[1:]))
            else:
                module.register_forward_hook(lambda m, args, out: _clamp(out))
            module._zimage_fp16_guard = True
            n += 1
    return n
