"""Fused projections: q, k, v as one matrix product, and the SwiGLU's w1, w3 as one.

The same dot products (cat of the weight matrices along the output dimension), in fewer, larger GEMMs that read
the input activation once. Weights are moved, not copied: the separate layers are removed, so memory is unchanged.
This module imports torch: it is imported only when an engine is being set up.
"""

from __future__ import annotations

import torch


def _fused_linear(layers) -> torch.nn.Linear:
    weight = torch.cat([layer.weight for layer in layers])  # (sum of out, in)
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    return fused


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
    and so is one whose projections are not plain Linears (runtime LoRA layers keep their own factors per layer)."""
    attn = block.attention
    if hasattr(attn, "to_qkv") or not all(type(m) is torch.nn.Linear for m in (attn.to_q, block.feed_forward.w1)):
        return
    attn.to_qkv = _fused_linear([attn.to_q, attn.to_k, attn.to_v])
    del attn.to_q, attn.to_k, attn.to_v
    block.feed_forward = FusedSwiGLU(block.feed_forward)
