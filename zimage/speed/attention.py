"""The attention processor of the fast path, and the choice of attention kernel.

Same computation as diffusers' ZSingleStreamAttnProcessor (q/k/v projections, per-head RMSNorm, RoPE, SDPA,
output projection) with RoPE in real arithmetic (zimage.speed.rope) and an explicit SDPA backend:
on Hopper and newer, cuDNN attention is ~1.8x flash SDPA at these shapes (DESIGN.md); elsewhere PyTorch picks.
A padding mask (batches of prompts of different lengths) always goes to PyTorch's default choice, which
supports masks on every GPU.
"""

from __future__ import annotations

from zimage.speed.rope import apply_rope

# diffusers AttentionBackendName values
NATIVE = "native"
CUDNN = "_native_cudnn"
FLASH = "_native_flash"


def choose_attention_backend(device) -> str:
    """cuDNN SDPA on compute capability >= 9.0 (Hopper, Blackwell); PyTorch's own choice elsewhere."""
    import torch

    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        return CUDNN
    return NATIVE


class RealRopeAttnProcessor:
    """Drop-in for diffusers' ZSingleStreamAttnProcessor; `freqs_cis` is real (B, L, D/2, 2) here."""

    def __init__(self, backend: str = NATIVE):
        from diffusers.models.attention_dispatch import AttentionBackendName

        # Enum members, not strings: constructing the enum inside a compiled graph can break fullgraph tracing.
        self.backend = AttentionBackendName(backend)
        self.masked_backend = AttentionBackendName(NATIVE)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if hasattr(attn, "to_qkv"):  # fused by zimage.speed.fuse
            q, k, v = attn.to_qkv(hidden_states).unflatten(-1, (3, attn.heads, -1)).unbind(2)  # 3 x (B, L, H, D)
        else:
            q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # (B, L, H, D)
            k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
            v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if freqs_cis is not None:
            q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        backend = self.backend
        if attention_mask is not None:
            attention_mask = attention_mask[:, None, None, :]  # (B, 1, 1, L): keys that exist
            backend = self.masked_backend
        out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, backend=backend)
        out = out.flatten(2, 3).to(q.dtype)  # (B, L, H*D)
        return attn.to_out[0](out)
