"""The Z-Image diffusion transformer (S3-DiT, 6.15B at full size) in plain torch, text-to-image only.

Importing diffusers costs seconds (package probes, torch._dynamo, peft, every model class), so we own the module
tree: the same parameter names as diffusers' `ZImageTransformer2DModel` (checkpoints load unchanged) and the same
op order (outputs match diffusers to fp32 rounding; tests/models/test_z_image.py).

The forward is split in two, so that per-request work runs once (zimage.models.z_image_step):
`model.prepare(captions, h, w)` once per request, then `model(x, t, ctx)` once per denoising step.

Differences from diffusers, none numerical: RoPE tables are real (cos, sin) pairs instead of complex numbers (see
zimage.models.z_image.apply_rope), the attention kernel is chosen by an attribute instead of a processor object, and the Omni
variant's SigLIP branch is not built (text-to-image never uses it).
Shapes: B batch, L tokens, D = dim (3840), H heads (30), hd = D / H = 128 head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ADALN_EMBED_DIM = 256  # width of the timestep embedding that modulates every block
NATIVE = "native"  # PyTorch's own SDPA kernel choice
CUDNN = "cudnn"  # cuDNN attention (~1.8x flash SDPA on Hopper at 1024x1024's 4096+ tokens, head dim 128)
ATTENTION_BACKENDS = (NATIVE, CUDNN)


class RMSNorm(nn.Module):
    """diffusers' RMSNorm: x * rsqrt(mean(x^2) + eps) in fp32, cast to the weight's dtype if half, times weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if not torch.compiler.is_compiling():
            # Eager: PyTorch's fused kernel (one read, one write; fp32 inside). The unfused ops below were ~40 of
            # an eager forward's 145 ms at 1024x1024 on an H200 (casts, pow, mean, two multiplies per call, 192
            # calls). It rounds once where diffusers rounds twice (before and after the weight): within bf16 noise.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        variance = x.float().pow(2).mean(-1, keepdim=True)  # compiled: diffusers' exact order, fused by inductor
        x = x * torch.rsqrt(variance + self.eps)  # fp32 (type promotion), as diffusers
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def apply_rope(x, freqs):
    """x (B, L, H, hd) any float dtype; freqs (B, L, hd/2, 2) fp32 (cos, sin) -> (B, L, H, hd) in x's dtype.

    Eager: one complex multiply (2 kernels; the real form is ~8 unfused kernels, measured +17 ms per forward at
    1024x1024 on an H200). Compiled: the real form, which inductor fuses into the surrounding kernels (it cannot
    generate code for complex operators). Both compute (a + ib)(c + is) in fp32, as the reference does.
    """
    if not torch.compiler.is_compiling():
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, H, hd/2)
        fc = torch.view_as_complex(freqs).unsqueeze(2)  # (B, L, 1, hd/2)
        return torch.view_as_real(xc * fc).flatten(3).type_as(x)
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, H, hd/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = freqs[..., 0].unsqueeze(2), freqs[..., 1].unsqueeze(2)  # (B, L, 1, hd/2)
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    """Self-attention with per-head RMSNorm on q and k, then RoPE (diffusers' Attention + ZSingleStreamAttnProcessor).

    `backend` picks the SDPA kernel (NATIVE or CUDNN); a padding mask always goes to PyTorch's own choice, which
    supports masks on every GPU. zimage.speed.fuse may replace to_q/to_k/to_v by one `to_qkv`.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.norm_q = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # a list: checkpoint names are to_out.0.*
        self.backend = NATIVE

    def forward(self, x, mask, freqs):
        """x (B, L, D); mask (B, L) bool (True: a real key) or None; freqs (B, L, hd/2, 2) or None -> (B, L, D)."""
        if hasattr(self, "to_qkv"):  # fused by zimage.speed.fuse
            q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # 3 x (B, L, H, hd)
        else:
            q = self.to_q(x).unflatten(-1, (self.heads, -1))  # (B, L, H, hd)
            k = self.to_k(x).unflatten(-1, (self.heads, -1))
            v = self.to_v(x).unflatten(-1, (self.heads, -1))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        if freqs is not None:
            q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, hd)
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        elif self.backend == CUDNN:
            # The (B, L, H, hd)-ordered views as they are: cuDNN reads strided inputs and writes its output in q's
            # order, so the reshape below is a view. Measured on an H200 (compiled block, 4160 tokens,
            # benchmarks/experiments/attention_layout_probe.py): bitwise the same output as contiguous copies,
            # 2.956 against 3.010 ms per block (the v copy and most of the output copy gone).
            out = cudnn_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.permute(0, 2, 1, 3).flatten(2, 3)  # (B, L, D)
        return self.to_out[0](out)


def cudnn_attention(q, k, v):
    """(B, H, L, hd) x 3 -> (B, H, L, hd): the kernel SDPA runs under sdpa_kernel(CUDNN_ATTENTION), called directly.
    A compiled graph that enters that context manager changes global state inside the graph, and AOTAutograd then
    bypasses its cache: a second process re-traces the blocks (measured on an H200: 2 of 3 graphs bypassed)."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False)[0]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre/post-normed attention and SwiGLU; with `modulation`, scaled and tanh-gated by the timestep embedding."""

    def __init__(self, dim: int, heads: int, norm_eps: float, qk_norm: bool, modulation: bool):
        super().__init__()
        self.attention = Attention(dim, heads, qk_norm)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = RMSNorm(dim, eps=norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_EMBED_DIM), 4 * dim, bias=True))

    def forward(self, x, mask, freqs, adaln=None):
        """x (B, L, D); mask (B, L) bool or None; freqs (B, L, hd/2, 2); adaln (B, 256) when modulated."""
        if not self.modulation:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, freqs))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        mod = self.adaLN_modulation(adaln)  # (B, 4D)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)  # 4 x (B, 1, D)
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        attn = self.attention(self.attention_norm1(x) * scale_msa, mask, freqs)
        x = x + gate_msa * self.attention_norm2(attn)
        return x + gate_mlp * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by the timestep embedding, then the projection to patch pixels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_EMBED_DIM), dim, bias=True))

    def forward(self, x, c):
        """x (B, L, D), c (B, 256) -> (B, L, out_channels)."""
        scale = 1.0 + self.adaLN_modulation(c).unsqueeze(1)  # (B, 1, D)
        return self.linear(self.norm_final(x) * scale)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (fp32) -> MLP -> (B, out_size)."""

    def __init__(self, out_size: int, mid_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, mid_size, bias=True), nn.SiLU(),
                                 nn.Linear(mid_size, out_size, bias=True))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t):
        """t (B,) -> (B, out_size) in the weights' dtype."""
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class ZImageTransformer(nn.Module):
    """Parameters and blocks of Z-Image's transformer, built from a diffusers `transformer/config.json` dict."""

    def __init__(self, config: dict):
        super().__init__()
        c = _transformer_config(config)
        dim, heads, eps, qk_norm = c["dim"], c["n_heads"], c["norm_eps"], c["qk_norm"]
        self.config = c
        self.in_channels = c["in_channels"]
        self.patch = 2  # all_patch_size (2,), all_f_patch_size (1,): checked in _transformer_config
        self.t_scale = c["t_scale"]
        self.rope_theta = c["rope_theta"]
        self.axes_dims = list(c["axes_dims"])
        self.axes_lens = list(c["axes_lens"])
        patch_dim = self.patch * self.patch * self.in_channels
        self.all_x_embedder = nn.ModuleDict({"2-1": nn.Linear(patch_dim, dim, bias=True)})
        self.all_final_layer = nn.ModuleDict({"2-1": FinalLayer(dim, patch_dim)})
        n_ref = c["n_refiner_layers"]
        self.noise_refiner = nn.ModuleList(
            [TransformerBlock(dim, heads, eps, qk_norm, modulation=True) for _ in range(n_ref)])
        self.context_refiner = nn.ModuleList(
            [TransformerBlock(dim, heads, eps, qk_norm, modulation=False) for _ in range(n_ref)])
        self.t_embedder = TimestepEmbedder(min(dim, ADALN_EMBED_DIM), mid_size=1024)
        self.cap_embedder = nn.Sequential(RMSNorm(c["cap_feat_dim"], eps=eps), nn.Linear(c["cap_feat_dim"], dim))
        self.x_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.cap_pad_token = nn.Parameter(torch.zeros((1, dim)))
        self.layers = nn.ModuleList(
            [TransformerBlock(dim, heads, eps, qk_norm, modulation=True) for _ in range(c["n_layers"])])
        self._rope_tables: dict = {}  # device -> per-axis (axes_lens[i], axes_dims[i]/2, 2) fp32; not a buffer

    def blocks(self) -> list:
        return list(self.noise_refiner) + list(self.context_refiner) + list(self.layers)

    def prepare(self, captions: list, height: int, width: int):
        """Once per request: captions B tensors (L_i, cap_dim), latent size (h, w) -> a StepContext."""
        from zimage.models.z_image_step import prepare

        return prepare(self, captions, height, width)

    def forward(self, x, t, ctx):
        """Once per step: x (B, C, h, w) in the model dtype, t (B,) in [0, 1], ctx from `prepare` -> velocity
        (B, C, h, w) in the model dtype."""
        from zimage.models.z_image_step import forward

        return forward(self, x, t, ctx)

    def rope(self, ids):
        """Position ids (L, 3) int -> real RoPE table (L, hd/2, 2) fp32 (cos, sin), axes concatenated.

        Angles as diffusers computes them: theta^(-2j/d) in float64, times the position, then fp32."""
        tables = self._rope_tables.get(ids.device)
        if tables is None:
            tables = []
            for d, n in zip(self.axes_dims, self.axes_lens):
                inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
                angles = torch.outer(torch.arange(n, dtype=torch.float64), inv).float()  # (n, d/2)
                polar = torch.polar(torch.ones_like(angles), angles)  # as diffusers (bitwise; cos()/sin() differ)
                tables.append(torch.view_as_real(polar).to(ids.device))  # (n, d/2, 2)
            self._rope_tables[ids.device] = tables
        return torch.cat([t[ids[:, i]] for i, t in enumerate(tables)], dim=1)

    @staticmethod
    def coordinate_grid(size: tuple[int, int, int], start: tuple[int, int, int], device):
        """(f, h, w) positions starting at `start` -> (f*h*w, 3) int32 ids, frame-major then row-major."""
        axes = [torch.arange(s0, s0 + n, dtype=torch.int32, device=device) for s0, n in zip(start, size)]
        return torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).flatten(0, 2)


_DEFAULTS = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                 n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                 siglip_feat_dim=None, rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48),
                 axes_lens=(1024, 512, 512))  # diffusers' ZImageTransformer2DModel defaults


def _transformer_config(config: dict) -> dict:
    """The config with diffusers' defaults filled in; what this module cannot build raises ValueError naming it."""
    c = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    unknown = sorted(set(c) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown transformer config keys {unknown}")
    if tuple(c["all_patch_size"]) != (2,) or tuple(c["all_f_patch_size"]) != (1,):
        raise ValueError(f"all_patch_size={c['all_patch_size']}, all_f_patch_size={c['all_f_patch_size']}: "
                         "only (2,) and (1,) (Z-Image text-to-image) are supported")
    if c["siglip_feat_dim"] is not None:
        raise ValueError(f"siglip_feat_dim={c['siglip_feat_dim']} (the Omni variant) is not supported")
    if c["dim"] % c["n_heads"] or c["dim"] // c["n_heads"] != sum(c["axes_dims"]):
        raise ValueError(f"dim {c['dim']} / n_heads {c['n_heads']} must be a head dim equal to "
                         f"sum(axes_dims) = {sum(c['axes_dims'])}")
    if len(c["axes_dims"]) != 3 or len(c["axes_lens"]) != 3:
        raise ValueError(f"axes_dims {c['axes_dims']} and axes_lens {c['axes_lens']} must have 3 entries")
    return c
