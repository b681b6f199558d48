"""Fused projections: q, k, v as one matrix product, and the SwiGLU's w1, w3 as one.

The same dot products (cat of the weight matrices along the output dimension), in fewer, larger GEMMs that read
the input activation once. Weights are moved, not copied: the separate layers are removed, so memory is unchanged.
"""

from __future__ import annotations


def _fused_linear(layers):
    import torch

    weight = torch.cat([l.weight for l in layers])  # (sum of out, in)
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    return fused


class FusedSwiGLU:
    """Replaces diffusers' FeedForward: w2(silu(w1 x) * w3 x) with w1, w3 fused. Keeps the name `w2` (the fp16
    guard hooks it)."""

    def __new__(cls, feed_forward):
        import torch

        class _FusedSwiGLU(torch.nn.Module):
            def __init__(self, ff):
                super().__init__()
                self.w13 = _fused_linear([ff.w1, ff.w3])
                self.w2 = ff.w2

            def forward(self, x):
                a, b = self.w13(x).chunk(2, dim=-1)
                return self.w2(torch.nn.functional.silu(a) * b)

        return _FusedSwiGLU(feed_forward)


def fuse_block(block) -> None:
    """Fuse one ZImageTransformerBlock in place (attention q/k/v, feed-forward w1/w3)."""
    attn = block.attention
    attn.to_qkv = _fused_linear([attn.to_q, attn.to_k, attn.to_v])
    del attn.to_q, attn.to_k, attn.to_v
    block.feed_forward = FusedSwiGLU(block.feed_forward)
