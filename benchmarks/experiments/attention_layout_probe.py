"""Probe (issue 19 part 2): do the layout copies around cuDNN attention cost a compiled block time, and can they go?

    python benchmarks/experiments/attention_layout_probe.py [--calls 40]

Today zimage.models.z_image.Attention hands cuDNN q, k, v made contiguous in (B, H, L, hd) (`.contiguous()` after
the permute from the projections' (B, L, H, hd)), and reshapes the (B, H, L, hd) output back to (B, L, H*hd), which
is a copy unless the kernel wrote it in (B, L, H, hd) order. cuDNN takes strided inputs with a unit last stride, so
the variant "strided" passes the permuted views as they are. For one fused, modulated block at 1024x1024 (4096 image
+ 64 caption tokens, bf16, H200), compiled, each variant: ms per call (median of CUDA-event timed calls), the
output's max difference from today's, the strides cuDNN's output comes back with in eager, and the block's kernels
by GPU time (torch.profiler, one call). Not part of the product; its output goes into BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import zimage.models.z_image as zi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cuda_ms  # noqa: E402


def strided_forward(self, x, mask, freqs):
    """zimage.models.z_image.Attention.forward (fused, cuDNN, no mask) without the `.contiguous()` copies."""
    q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)
    q, k = self.norm_q(q), self.norm_k(k)
    q, k = zi.apply_rope(q, freqs), zi.apply_rope(k, freqs)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, hd) views of (B, L, H, hd)
    out = zi.cudnn_attention(q, k, v)
    return self.to_out[0](out.permute(0, 2, 1, 3).flatten(2, 3))


def block_and_inputs():
    from zimage.speed.fuse import fuse_block

    torch.manual_seed(0)
    with torch.device("cuda"):
        block = zi.TransformerBlock(3840, 30, 1e-5, True, True).to(torch.bfloat16)
    fuse_block(block)
    block.attention.backend = zi.CUDNN
    g = torch.Generator("cuda").manual_seed(123)
    x = torch.randn(1, 4160, 3840, device="cuda", dtype=torch.bfloat16, generator=g)
    freqs = torch.randn(1, 4160, 64, 2, device="cuda", dtype=torch.float32, generator=g)
    adaln = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    return block, (x, None, freqs, adaln)


def kernels(fn, args, top: int = 14) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[1])
    return [f"{t:8.1f} us x{n:<3d} {name[:110]}" for name, t, n in rows[:top]]


def main() -> int:
    calls = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 40
    q = torch.randn(1, 4160, 30, 128, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3)
    out = zi.cudnn_attention(q, q, q)
    print(f"eager cuDNN on (B, L, H, hd)-strided inputs: output shape {tuple(out.shape)} strides {out.stride()}; "
          f"on contiguous inputs: {zi.cudnn_attention(*(q.contiguous(),) * 3).stride()}")
    with torch.inference_mode():
        block, args = block_and_inputs()
        ref = None
        original = zi.Attention.forward
        for variant in ("contiguous", "strided"):
            if variant == "strided":
                zi.Attention.forward = strided_forward
            torch._dynamo.reset()
            compiled = torch.compile(block, fullgraph=True)
            ms = cuda_ms(lambda: compiled(*args), calls, warmup=5)
            y = compiled(*args)
            ref = y if ref is None else ref
            diff = (y.float() - ref.float()).abs().max().item()
            print(f"{variant}: {ms:.3f} ms per block, max |diff| from contiguous {diff:.3g} "
                  f"(|out| max {ref.abs().max().item():.3g})")
            for line in kernels(compiled, args):
                print("   ", line)
        zi.Attention.forward = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
