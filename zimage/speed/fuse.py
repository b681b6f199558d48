"""Fused projections: q, k, v as one matrix product, and the SwiGLU's w1, w3 as one.

The same dot products (cat of the weight matrices along the output dimension), in fewer, larger GEMMs that read
the input activation once. Weights are moved, not copied: the separate layers are removed, so memory is unchanged.
This module imports torch: it is imported only when an engine is being set up.
"""

from __future__ import annotations

import torch


def _fused_linear(layers) -> torch.nn.Module:
    """One linear for `layers` (plain Linears, or runtime LoRA layers over plain Linears: then a LoRA layer of
    len(layers) parts over the fused base, each part keeping its own slots)."""
    from zimage.models.lora import LoraLinear

    if isinstance(layers[0], LoraLinear):
        return LoraLinear.fused(_fused_linear([layer.base for layer in layers]), layers)
    weight = torch.cat([layer.weight for layer in layers])  # (sum of out, in)
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    return fused


def _fusable(layers) -> bool:
    """Plain bias-free Linears, or runtime LoRA layers over them that fuse (LoraLinear.fusable); not fp8 layers."""
    from zimage.models.lora import LoraLinear

    if all(type(m) is torch.nn.Linear for m in layers):
        return all(m.bias is None for m in layers)
    return LoraLinear.fusable(layers) and _fusable([m.base for m in layers])


class FusedSwiGLU(torch.nn.Module):
    """Replaces zimage.models.z_image.FeedForward: w2(silu(w1 x) * w3 x), w1 and w3 fused. Keeps the name `w2` (the
    fp16 guard hooks it). One class for every block, so compiled graphs are shared (a class per block would make
    dynamo recompile for each)."""

    def __init__(self, feed_forward):
        super().__init__()
        self.w13 = _fused_linear([feed_forward.w1, feed_forward.w3])
        self.w2 = feed_forward.w2

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(torch.nn.functional.silu(a) * b)


def fuse_block(block) -> None:
    """Fuse one ZImageTransformerBlock in place (attention q/k/v, feed-forward w1/w3). A fused block is left as is,
    and so is one whose projections are neither plain Linears nor runtime LoRA layers over them (fp8 layers keep
    their own per-row scales)."""
    attn = block.attention
    ff = block.feed_forward
    if hasattr(attn, "to_qkv") or not (_fusable([attn.to_q, attn.to_k, attn.to_v]) and _fusable([ff.w1, ff.w3])):
        return
    attn.to_qkv = _fused_linear([attn.to_q, attn.to_k, attn.to_v])
    del attn.to_q, attn.to_k, attn.to_v
    block.feed_forward = FusedSwiGLU(block.feed_forward)
