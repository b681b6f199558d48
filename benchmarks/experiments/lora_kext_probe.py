"""Probe (issue 15): does a runtime LoRA cost less as a wider GEMM than as an in-place add onto the base output?

    python benchmarks/experiments/lora_kext_probe.py [--full] [--ranks 32,64,128]

Today's runtime slot computes y = x W^T, then adds (x A^T) B^T into y in place: the add reads and writes y, about as
many bytes as the base GEMM writes. The "K-extended" form computes the same in one GEMM over a wider inner
dimension: y = [x | x A^T] [W | B]^T, where [x | ...] is x padded by P*R columns (inductor writes the pad from the
producer of x, so no copy) and the tail is filled by one thin GEMM. The extension columns of [W | B] hold one set
(the batch's), so this form serves batches whose LoRA rows all use one slot.

One fused, modulated transformer block (1024x1024: 4096 image + 64 caption tokens, bf16 on CUDA with --full; a small
fp32 one on CPU otherwise), compiled, median of CUDA-event timed calls: plain, today's slots (4 slots of rank R),
K-extended on q/k/v, w1/w3 and w2 (the attention output keeps the in-place add: its input comes from the attention
kernel, so a pad would copy it), and K-extended on every linear. Prints ms per block and the max difference from
today's slots. Not part of the product; its output goes into the session note.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zimage.models.lora import LoraLinear, wrap_linears

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cuda_ms  # noqa: E402


@torch.library.custom_op("zimage_probe::fill_lora_down_", mutates_args=("xp",))
def fill_lora_down_(xp: torch.Tensor, down_t: torch.Tensor) -> None:
    """xp (B, L, in + K): columns [in, in + K) <- xp[..., :in] @ down_t (B, in, K), in place."""
    k = down_t.shape[-1]
    n = xp.shape[-1] - k
    xp[..., n:].baddbmm_(xp[..., :n], down_t, beta=0.0)


@fill_lora_down_.register_fake
def _(xp, down_t):
    return None


class KextLinear(nn.Module):
    """A fused LoraLinear's slot `slot` as one GEMM over [x | x A^T]: weight (out, in + P*R) = [W | blockdiag(B_p)]."""

    def __init__(self, layer: LoraLinear, slot: int):
        super().__init__()
        w = layer.base.weight
        parts, rank, n = layer.parts, layer.rank, layer.out_features // layer.parts
        ext = torch.zeros(w.shape[0], parts * rank, dtype=w.dtype, device=w.device)
        for p in range(parts):
            ext[p * n:(p + 1) * n, p * rank:(p + 1) * rank] = layer.lora_up[slot, p * n:(p + 1) * n]
        self.weight = nn.Parameter(torch.cat([w, ext], dim=1), requires_grad=False)
        self.lora_down = layer.lora_down
        self.rows = layer.rows
        self.k = parts * rank

    def forward(self, x):
        lead = x.shape
        xp = F.pad(x, (0, self.k)).reshape(lead[0], -1, lead[-1] + self.k)  # (B, L, in + K)
        down = self.lora_down[self.rows.index] * self.rows.active  # (B, K, in); rows without LoRA get 0
        fill_lora_down_(xp, down.transpose(1, 2))
        return F.linear(xp, self.weight).reshape(*lead[:-1], -1)


def block_and_inputs(full: bool, rank: int | None, variant: str):
    from zimage.models.z_image import TransformerBlock
    from zimage.speed.fuse import fuse_block

    device, dtype = ("cuda", torch.bfloat16) if full else ("cpu", torch.float32)
    dim, heads, tokens = (3840, 30, 4160) if full else (64, 2, 40)
    torch.manual_seed(0)
    with torch.device(device):
        block = TransformerBlock(dim, heads, 1e-5, True, True).to(dtype)
    if rank is not None:
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        rows, layers = wrap_linears(block, names, 4, rank, dtype)
        g = torch.Generator(device).manual_seed(1)
        for layer in layers.values():
            i, o = layer.in_features, layer.out_features
            layer.write(0, torch.randn(rank, i, generator=g, device=device, dtype=dtype) / i ** 0.5,
                        torch.randn(o, rank, generator=g, device=device, dtype=dtype) * 1e-2)
        rows.set([0], device, dtype)
    fuse_block(block)
    if variant.startswith("kext"):
        attn, ff = block.attention, block.feed_forward
        attn.to_qkv = KextLinear(attn.to_qkv, 0)
        ff.w13 = KextLinear(ff.w13, 0)
        ff.w2 = KextLinear(ff.w2, 0)
        if variant == "kext_all":
            attn.to_out[0] = KextLinear(attn.to_out[0], 0)
    g = torch.Generator(device).manual_seed(123)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=g)
    freqs = torch.randn(1, tokens, dim // heads // 2, 2, device=device, dtype=torch.float32, generator=g)
    adaln = torch.randn(1, min(dim, 256), device=device, dtype=dtype, generator=g)
    return block, (x, None, freqs, adaln)


def time_ms(fn, args, full: bool, calls: int = 40) -> float:
    """Median ms per call on the GPU; on the CPU (a correctness check only) nan after the warm-up calls."""
    if not full:
        for _ in range(5):
            fn(*args)
        return float("nan")
    return cuda_ms(lambda: fn(*args), calls, warmup=5)


def main() -> int:
    full = "--full" in sys.argv
    ranks = [32, 64, 128]
    if "--ranks" in sys.argv:
        ranks = [int(r) for r in sys.argv[sys.argv.index("--ranks") + 1].split(",")]
    with torch.inference_mode():
        block, args = block_and_inputs(full, None, "plain")
        print(f"plain: {time_ms(torch.compile(block), args, full):.3f} ms")
        del block
        for rank in ranks:
            ref_block, args = block_and_inputs(full, rank, "slots")
            ref = ref_block(*args)
            print(f"rank {rank} slots: {time_ms(torch.compile(ref_block), args, full):.3f} ms")
            del ref_block
            for variant in ("kext", "kext_all"):
                block, args = block_and_inputs(full, rank, variant)
                compiled = torch.compile(block)
                ms = time_ms(compiled, args, full)
                diff = (compiled(*args).float() - ref.float()).abs().max().item()
                print(f"rank {rank} {variant}: {ms:.3f} ms, max |diff| from slots {diff:.3g} "
                      f"(|out| max {ref.abs().max().item():.3g})")
                del block, compiled
            torch._dynamo.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
