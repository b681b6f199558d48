"""Probe (issue 19 part 2): does a GEMM that applies the modulated RMSNorm while it loads its input (a prologue)
beat inductor's fused norm kernel followed by cuBLAS?

    python benchmarks/experiments/gemm_prologue_probe.py [--calls 40]

In a modulated block, each of q/k/v (fused: N = 3 x 3840) and w1/w3 (fused: N = 2 x 10240) reads
a = RMSNorm(x) * (1 + scale): inductor computes `a` in one kernel (reads x, writes a: 32 MB each way at 4160 tokens
x 3840, bf16), then cuBLAS reads `a`. A prologue GEMM reads x itself and normalises each tile as it loads it, given
each row's 1 / rms (a 4160-float row reduction, 17 KB): the 32 MB write and read of `a` go, but the GEMM is Triton's,
not cuBLAS's. At 1024x1024 (4160 tokens, bf16, H200), each variant's ms per call (median of CUDA-event timed calls)
and its max difference from the compiled reference:

- compiled:   torch.compile of F.linear(RMSNorm(x) * (1 + scale), W), zimage's form (norm kernel + cuBLAS)
- cublas:     cuBLAS on a precomputed `a` (the GEMM alone: the floor of any prologue form built on cuBLAS)
- triton:     the Triton GEMM below on the precomputed `a` (Triton's GEMM against cuBLAS's)
- prologue:   rstd by a compiled row reduction, then the Triton GEMM normalising x in its prologue

Not part of the product; its output goes into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cuda_ms  # noqa: E402

CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP": 8}, num_warps=w, num_stages=s)
           for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 4),
                                    (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4)]]


@triton.autotune(CONFIGS, key=["M", "N", "K", "PROLOGUE"])
@triton.jit
def gemm(x_ptr, w_ptr, y_ptr, rstd_ptr, g_ptr, s_ptr, M, N, K, PROLOGUE: tl.constexpr,
         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr):
    """y (M, N) = a @ w^T, w (N, K); with PROLOGUE, a = (x * rstd[m] in fp32 -> bf16) * g[k] * (1 + s[k]), the
    compiled RMSNorm's order (fp32 normalise, round, then the weight and the modulation in bf16)."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP * grid_n)
    first_m = group * GROUP
    size_m = min(grid_m - first_m, GROUP)
    pid_m = first_m + (pid % size_m)
    pid_n = (pid % (GROUP * grid_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    if PROLOGUE:
        rstd = tl.load(rstd_ptr + rm, mask=rm < M, other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        if PROLOGUE:
            g = tl.load(g_ptr + k0 + rk)
            s = tl.load(s_ptr + k0 + rk)
            a = (a.to(tl.float32) * rstd[:, None]).to(tl.bfloat16) * g[None, :] * (1.0 + s[None, :])
        b = tl.load(w_ptr + rn[None, :] * K + (k0 + rk)[:, None], mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=(rm[:, None] < M) & (rn[None, :] < N))


def triton_gemm(x, w, rstd=None, g=None, s=None):
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=torch.bfloat16)
    prologue = rstd is not None
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    gemm[grid](x, w, y, rstd if prologue else x, g if prologue else x, s if prologue else x, M, N, K,
               PROLOGUE=prologue)
    return y


def reference(x, w, g, s, eps=1e-5):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    a = (x * torch.rsqrt(variance + eps)).to(torch.bfloat16) * g
    return torch.nn.functional.linear(a * (1.0 + s), w)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=40)
    args = p.parse_args()
    torch.manual_seed(0)
    M, K = 4160, 3840
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    g = (1 + 0.1 * torch.randn(K, device="cuda")).to(torch.bfloat16)
    s = (0.1 * torch.randn(K, device="cuda")).to(torch.bfloat16)
    compiled = torch.compile(reference, fullgraph=True)
    row_rstd = torch.compile(lambda x: torch.rsqrt(x.float().pow(2).mean(-1) + 1e-5), fullgraph=True)
    for name, n in (("q/k/v fused", 3 * 3840), ("w1/w3 fused", 2 * 10240)):
        w = (torch.randn(n, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
        ref = compiled(x, w, g, s)
        a = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16) * g * (1 + s)
        variants = {
            "compiled": lambda: compiled(x, w, g, s),
            "cublas": lambda: torch.nn.functional.linear(a, w),
            "triton": lambda: triton_gemm(a, w),
            "prologue": lambda: triton_gemm(x, w, row_rstd(x), g, s),
        }
        flops = 2 * M * n * K
        print(f"{name}: M={M} N={n} K={K}")
        for v, fn in variants.items():
            out = fn()
            ms = cuda_ms(fn, repeats=args.calls, warmup=5, busy_ahead=True)
            diff = (out.float() - ref.float()).abs().max().item()
            print(f"  {v:9s} {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  max |diff| {diff:.3g} "
                  f"(|ref| max {ref.abs().max().item():.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
