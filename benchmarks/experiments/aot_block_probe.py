"""Probe (issue 19 part 3): can one transformer block be compiled ahead of time with torch.compile(...).aot_compile,
saved, and loaded in a fresh process without dynamo tracing it again, and shared by blocks with other weights?

    python benchmarks/experiments/aot_block_probe.py save DIR [--full]   # compile + save, prints seconds
    python benchmarks/experiments/aot_block_probe.py load DIR [--full]   # load + call, prints seconds and max |diff|

The block is zimage's TransformerBlock (modulated, q/k/v fused as compile mode fuses them), random weights, on CUDA
in bf16 at 1024x1024's 4096 image + 64 caption tokens with --full (else a small CPU one). `load` builds two blocks
with other random weights and checks the loaded function against each block's eager forward: a function that baked
in the first block's weights would fail the second. Not part of the product; its output goes into the session note.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def block_and_inputs(full: bool, seed: int):
    import torch

    from zimage.models.z_image import TransformerBlock
    from zimage.speed.fuse import fuse_block

    device, dtype = ("cuda", torch.bfloat16) if full else ("cpu", torch.float32)
    dim, heads, tokens = (3840, 30, 4160) if full else (64, 2, 40)
    torch.manual_seed(seed)
    with torch.device(device):
        block = TransformerBlock(dim, heads, 1e-5, True, True).to(dtype)
    fuse_block(block)
    g = torch.Generator(device).manual_seed(123)
    x = torch.randn(1, tokens, dim, device=device, dtype=dtype, generator=g)
    freqs = torch.randn(1, tokens, dim // heads // 2, 2, device=device, dtype=torch.float32, generator=g)
    adaln = torch.randn(1, min(dim, 256), device=device, dtype=dtype, generator=g)
    return block, (x, None, freqs, adaln)


def forward(block, x, mask, freqs, adaln):
    return block(x, mask, freqs, adaln)


def main() -> int:
    import torch

    mode, folder, full = sys.argv[1], Path(sys.argv[2]), "--full" in sys.argv
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "block.aot"
    sync = torch.cuda.synchronize if full else (lambda: None)
    # torch 2.11 hides .aot_compile behind this flag (2.13 has it on by default)
    with torch.inference_mode(), torch._dynamo.config.patch(enable_aot_compile=True):
        if mode == "save":
            block, args = block_and_inputs(full, 0)
            t = time.perf_counter()
            compiled = torch.compile(forward, fullgraph=True).aot_compile(((block, *args), {}))
            print(f"aot_compile: {time.perf_counter() - t:.2f} s")
            t = time.perf_counter()
            compiled.save_compiled_function(str(path))
            print(f"save: {time.perf_counter() - t:.2f} s, {path.stat().st_size / 1e6:.1f} MB")
            return 0
        t = time.perf_counter()
        with open(path, "rb") as f:
            loaded = torch.compiler.load_compiled_function(f)
        print(f"load: {time.perf_counter() - t:.2f} s")
        for seed in (1, 2):
            block, args = block_and_inputs(full, seed)
            t = time.perf_counter()
            out = loaded(block, *args)
            sync()
            first = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(5):
                out = loaded(block, *args)
            sync()
            steady = (time.perf_counter() - t) / 5
            ref = forward(block, *args)
            diff = (out.float() - ref.float()).abs().max().item()
            print(f"block seed {seed}: first call {first:.3f} s, steady {steady * 1000:.2f} ms, "
                  f"max |aot - eager| {diff:.3g} (|eager| max {ref.abs().max().item():.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
