"""The VAE decode of one image, compiled or eager, with and without cuDNN's per-shape algorithm search
(torch.backends.cudnn.benchmark): its steady time and what its first call costs in a fresh process.

    python benchmarks/bench_vae_decode.py [--size 1024x1024] [--repeats 10] [--out DIR]

The Flux VAE decoder in the published shape (random weights: timing does not depend on their values), bf16,
channels_last, on CUDA. Each variant runs in two child processes sharing one inductor cache folder: `cold` (empty
folder: compiles) and `second` (the folder `cold` wrote: what a second start of a server pays). Each child reports
its first decode's seconds (tracing, cache lookups, cuDNN's algorithm search, the kernels themselves) and the median
of `repeats` decodes after it. Writes benchmarks/results/vae_decode_<gpu>_<date>.json.
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
import json, statistics, sys, time
t0 = time.perf_counter()
import torch
from zimage.models.published import FULL_VAE, VAE_LAYOUT
from zimage.models.vae import VAEDecoder
compiled, autotune = sys.argv[1] == "1", sys.argv[2] == "1"
h, w, repeats = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with torch.device("cuda"):
    vae = VAEDecoder({**VAE_LAYOUT, **FULL_VAE}).to(torch.bfloat16)
vae.to(memory_format=torch.channels_last)  # as zimage.speed.apply.compile_blocks does
if compiled:
    vae.decoder.compile()
z = torch.randn(1, 16, h // 8, w // 8, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
t_ready = time.perf_counter()
with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, benchmark=autotune):
    vae.decode(z)
    torch.cuda.synchronize()
    first = time.perf_counter() - t_ready
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        vae.decode(z)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
print(json.dumps({"first_call_s": first, "steady_s": statistics.median(times), "steady_all_s": times,
                  "ready_s": t_ready - t0}))
"""


def run_child(compiled: bool, autotune: bool, size, repeats: int, cache: Path) -> dict:
    env = package_env(REPO, TORCHINDUCTOR_CACHE_DIR=str(cache))
    env.pop("TRITON_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(int(compiled)), str(int(autotune)), str(size[1]),
                          str(size[0]), str(repeats)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="1024x1024", help="WxH of the decoded image")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    result = {"env": environment(), "size": args.size, "variants": {}}
    print(f"{'variant':<24}{'process':>8}{'first call s':>14}{'steady ms':>11}")
    for compiled in (True, False):
        for autotune in (True, False):
            name = f"{'compiled' if compiled else 'eager'}, autotune {'on' if autotune else 'off'}"
            runs = {}
            with tempfile.TemporaryDirectory(prefix="zimage-vae-") as cache:
                for process in ("cold", "second"):
                    r = run_child(compiled, autotune, size, args.repeats, Path(cache))
                    runs[process] = r
                    print(f"{name:<24}{process:>8}{r['first_call_s']:>14.2f}{r['steady_s'] * 1000:>11.1f}", flush=True)
            result["variants"][name] = runs
    print(f"wrote {write_json('vae_decode', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
