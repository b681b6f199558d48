"""Milliseconds per compiled transformer forward at 1024x1024 under inductor's modes: the default (zimage's compile
speed) against max-autotune's GEMM templates (Triton matmuls chosen by benchmarking, with the elementwise work
around them fused into their prologues and epilogues), to measure that lever (issue 19, part 2).

    python benchmarks/bench_compile_modes.py [--modes eager,default,max-autotune-no-cudagraphs] [--out DIR]

The full-size transformer, random weights (seed 0, the same in every mode), bf16, on CUDA, prepared as zimage's
compile speed prepares it (q/k/v and w1/w3 fused, cuDNN attention on Hopper, every block compiled with fullgraph);
one caption of 32 tokens. Each mode runs in a fresh child process with its own empty inductor cache, which reports
its compile seconds (the first forward), the median forward (CUDA events, 20 after warm-up) and its output, compared
with the first mode's (eager: the same modules uncompiled) by relative L2: bf16 noise for a lossless mode. Writes
benchmarks/results/compile_modes_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, environment, package_env, write_json

CHILD = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[3])
from common import cuda_ms
from zimage.models.published import FULL_TRANSFORMER
from zimage.models.z_image import ZImageTransformer
from zimage.speed.attention import choose_attention_backend, set_attention_backend
from zimage.speed.fuse import fuse_block

mode, out_path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
with torch.device("cuda"):
    model = ZImageTransformer(dict(FULL_TRANSFORMER)).to(torch.bfloat16).eval().requires_grad_(False)
for block in model.blocks():
    fuse_block(block)
    if mode != "eager":
        block.compile(fullgraph=True, **({} if mode == "default" else {"mode": mode}))
set_attention_backend(model, choose_attention_backend(torch.device("cuda")))
g = torch.Generator("cuda").manual_seed(1)
x = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16, generator=g)
cap = torch.randn(32, 2560, device="cuda", dtype=torch.bfloat16, generator=g)
t = torch.full((1,), 0.5, device="cuda")
with torch.inference_mode():
    ctx = model.prepare([cap], 128, 128)
    t0 = time.perf_counter()
    out = model(x, t, ctx)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    ms = cuda_ms(lambda: model(x, t, ctx), repeats=20, warmup=3)
torch.save(out.float().cpu(), out_path)
print(json.dumps({"mode": mode, "compile_s": compile_s, "forward_ms": ms}))
"""


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default="eager,default,max-autotune-no-cudagraphs",
                   help="'eager' or inductor modes, comma-separated; the first is the reference of the rel L2")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    res = {"env": environment(), "modes": {}}
    ref = None
    with tempfile.TemporaryDirectory(prefix="zimage-modes-") as work:
        for mode in args.modes.split(","):
            out_path = Path(work) / f"{mode}.pt"
            env = package_env(REPO, TORCHINDUCTOR_CACHE_DIR=str(Path(work) / f"inductor-{mode}"))
            run = subprocess.run([sys.executable, "-c", CHILD, mode, str(out_path), str(Path(__file__).parent)],
                                 env=env, capture_output=True, text=True, check=False)
            if run.returncode:
                res["modes"][mode] = {"error": run.stderr[-3000:]}
                print(f"{mode}: failed\n{run.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            out = torch.load(out_path)
            if ref is None:
                ref = out
            r["rel_l2_vs_first"] = float((out - ref).norm() / ref.norm())
            res["modes"][mode] = r
            print(f"{mode}: compile {r['compile_s']:.1f} s, {r['forward_ms']:.2f} ms / forward, "
                  f"rel L2 vs first {r['rel_l2_vs_first']:.2e}", flush=True)
    print(f"wrote {write_json('compile_modes', res, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
