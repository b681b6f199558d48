"""Opt-in, lossy FP8 for the transformer's matrices: float8_e4m3fn weights with one fp32 scale per output row.

Two uses of the same quantised layer (`FP8Linear`):
- storage (`matmul=False`, any device): the weight is dequantised to the compute dtype (bf16) right before each
  matmul. The transformer's matrices take 1 byte per element instead of 2 (12.3 GB -> ~6.2 GB at full size),
  plus 4 bytes per output row for the scales (~7.6 MB in all at full size).
- compute (`matmul=True`, GPUs with FP8 tensor cores: `fp8_matmul_supported`): the activation is quantised per
  row too (absmax / 448) and the product runs in `torch._scaled_mm` with rowwise scales, bf16 out, bias fused.

Which tensors are stored in fp8 is decided by the pattern the memory planner counts with
(zimage.models.tensor_names.FP8_KEEP), so planned fp8 sizes and what `quantize_transformer` does are the same by
construction (tests/test_fp8.py checks it tensor by tensor): every nn.Linear of the transformer whose weight
name the pattern does not keep, i.e. the blocks' attention (to_q/to_k/to_v/to_out.0, or a fused to_qkv),
feed-forward (w1/w2/w3, or a fused w13) and adaLN_modulation linears, and the final layer's linear and
adaLN_modulation. Embedders (x, caption, timestep), norms, pad tokens and biases stay in the compute dtype.

Quantise after zimage.speed.fuse (fusing concatenates `.weight`s, which fp8 layers do not have in a usable form)
and after the model has its compute dtype: `Module.to(dtype)` casts every floating-point tensor, float8 included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zimage.models.tensor_names import FP8_KEEP

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_MIN = 1e-12  # scales are clamped to this: an all-zero row quantises to zeros instead of 0/0
MATMUL_ALIGN = 16  # torch._scaled_mm: K (in_features) and N (out_features) must be multiples of 16


def _quantize_rows(t: torch.Tensor):
    """t (R, C) any float dtype -> (t_fp8 (R, C) float8_e4m3fn, scale (R, 1) fp32) with t ~= t_fp8 * scale.

    scale = row absmax / 448 (so the largest element lands on the largest finite fp8 value); the division is done
    in fp32 and clamped to +-448 before the cast (out-of-range casts are NaN on some backends)."""
    t = t.float()
    scale = (t.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=SCALE_MIN)
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(nn.Module):
    """A Linear whose weight is stored as float8_e4m3fn (out, in) times an fp32 scale per output row (out, 1).

    `weight` is a parameter without grad (it moves with `.to(device)`, is seen by code that walks
    `parameters()`, and is in `state_dict()`); `scale` is a persistent buffer; `bias` stays in the compute dtype.
    forward: x (..., in) in the compute dtype -> (..., out) in the compute dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 matmul: bool = False, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.matmul = bool(matmul)
        if self.matmul:
            _check_matmul_shape(in_features, out_features, compute_dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, matmul: bool = False) -> "FP8Linear":
        """Quantise `linear` (weight (out, in), any float dtype) per output row; keeps no reference to its weight."""
        weight = linear.weight
        out = cls(weight.shape[1], weight.shape[0], linear.bias is not None, weight.dtype, matmul, device="meta")
        w8, scale = _quantize_rows(weight.detach())
        out.weight = nn.Parameter(w8, requires_grad=False)
        out.scale = scale  # replaces the (meta) buffer, stays a buffer
        out.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return out

    @torch.no_grad()
    def set_rows(self, rows: slice, weight: torch.Tensor) -> None:
        """Rows `rows` of the weight <- `weight` (n, in) any float dtype, quantised as at load (a merged LoRA)."""
        w8, scale = _quantize_rows(weight.to(self.weight.device))
        self.weight[rows] = w8
        self.scale[rows] = scale

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) in the compute dtype, as forward(matmul=False) uses it."""
        return self.weight.to(self.compute_dtype) * self.scale.to(self.compute_dtype)

    def forward(self, x):
        if not self.matmul:
            return F.linear(x, self.dequantized(), self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        # Activations quantised per row (token) exactly as the weights are: scale_a fp32 (M, 1); x8 row-major
        # (M, K) as _scaled_mm wants its first operand (`.contiguous()` is a no-op unless x came in transposed).
        x8, scale_a = _quantize_rows(x2)
        x8 = x8.contiguous()
        # mat2 = weight.t(): (K, N) column-major, a view (no copy); scale_b = scale.t(): (1, N), stride (., 1).
        # Rowwise scaling outputs bf16 only (CUTLASS kernel, sm89/sm9x); the bias (bf16, (N,)) is fused in.
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=scale_a, scale_b=self.scale.t(), bias=self.bias,
                             out_dtype=self.compute_dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, matmul={self.matmul}")


def _check_matmul_shape(in_features: int, out_features: int, compute_dtype: torch.dtype) -> None:
    if in_features % MATMUL_ALIGN or out_features % MATMUL_ALIGN:
        raise ValueError(f"FP8Linear(matmul=True) needs in/out features that are multiples of {MATMUL_ALIGN} "
                         f"(torch._scaled_mm), got {in_features}x{out_features}")
    if compute_dtype != torch.bfloat16:
        raise ValueError(f"FP8Linear(matmul=True) needs a bf16 layer (rowwise-scaled _scaled_mm outputs bf16 only), "
                         f"got {compute_dtype}")


def fp8_names(model: nn.Module, matmul: bool = False) -> list[str]:
    """Module names of the nn.Linear layers `quantize_transformer(model, matmul)` would replace, in module order."""
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or FP8_KEEP.search(f"{name}.weight"):
            continue
        # With matmul=True, layers whose in/out features are not multiples of 16 stay in the compute dtype:
        # torch._scaled_mm cannot run them (at full size none such exists; the tiny model's FFN width 170 is one).
        # The planner's fp8 sizes then overcount those layers, which only the tiny test model has.
        if matmul and (module.in_features % MATMUL_ALIGN or module.out_features % MATMUL_ALIGN):
            continue
        names.append(name)
    return names


@torch.no_grad()
def quantize_transformer(model: nn.Module, matmul: bool = False) -> int:
    """Replace the eligible Linear layers of `model` (a zimage.models.z_image.ZImageTransformer, fused or not)
    by FP8Linear in place; returns how many were replaced.

    One layer at a time: only module names are held while iterating, so each bf16 weight is freed as soon as its
    fp8 copy replaces it (peak memory: the model plus one layer's fp8 copy and its fp32 temporaries). Layers on
    any device are quantised where they are (CPU, GPU, or meta for a shape-only model)."""
    count = 0
    for name in fp8_names(model, matmul):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[attr] = FP8Linear.from_linear(parent._modules[attr], matmul)
        count += 1
    return count


def fp8_matmul_supported(device) -> bool:
    """True on CUDA GPUs with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) when torch has
    `_scaled_mm`. ROCm builds are excluded: their FP8 GEMMs take the *fnuz* float8 variants on MI300, not e4m3fn."""
    device = torch.device(device)
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or getattr(torch.version, "hip", None):
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 9)
