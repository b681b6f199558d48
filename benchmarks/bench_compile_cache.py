"""Time to the first compiled image in a fresh process: no caches, inductor's local caches only, the portable artifact.

    python benchmarks/bench_compile_cache.py [--device auto|cpu|cuda] [--model DIR] [--size WxH] [--repeats 3] [--out DIR]

Each repeat uses a fresh zimage cache (ZIMAGE_CACHE, a temporary folder; TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR unset, so inductor and Triton use zimage's folder in it) and runs three child processes, each
`import -> Engine.load(speed=compile) -> one image`:

- cold:  empty caches (compiles everything; writes inductor's local entries and the artifact file)
- local: inductor's local caches from `cold`, the artifact file removed (zimage before the portable cache)
- mega:  the artifact file from `cold`, inductor's folder removed (a fresh machine given the file)

Reports the median seconds to the first image (from the child's start) and its parts, with the compile counters
(FX-graph / AOTAutograd cache hits and misses) that show where each process's graphs came from, and for each run
the first image's phases and dynamo's / inductor's own phase timers (where the seconds after loading go). On CUDA
the model is the full-size random one (benchmarks/common.py); on the CPU the tiny random model at 256x256, 2 steps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DEFAULT_MODEL_DIR, environment, package_env, write_json

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from torch._dynamo.utils import counters
from zimage.engine.engine import Engine
from zimage.request import GenerateRequest
t_import = time.perf_counter()
model, device, width, height, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
engine = Engine.load(model=model, device=device, speed="compile")
sync()
t_load = time.perf_counter()
req = GenerateRequest(prompts=("a red fox in the snow",), width=width, height=height, steps=steps, seed=1)
first = engine.generate(req)
sync()
t_first = time.perf_counter()
from torch._dynamo.utils import compilation_time_metrics
# where the first image's extra seconds went: dynamo's and inductor's own timers (seconds summed per phase, those
# over 50 ms), the image's phases (encode: text-encoder graph capture; denoise: the blocks; decode: the VAE)
compile_parts = {k: round(sum(v), 3) for k, v in compilation_time_metrics.items() if sum(v) > 0.05}
engine.generate(GenerateRequest(prompts=("a red fox in the snow, again",), width=width, height=height, steps=steps,
                                seed=2))
sync()
t_second = time.perf_counter()
a = engine.speed_setup.artifacts
print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "first_image_s": t_first - t_load,
                  "second_image_s": t_second - t_first, "to_first_image_s": t_first - t0,
                  "first_image_phases": {k: round(v, 3) for k, v in first.timings.items()},
                  "compile_parts": compile_parts,
                  "artifacts": None if a is None else {"status": a.status, "loaded": a.loaded, "saves": a.saves},
                  "fxgraph": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
                  "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}}))
"""

SCENARIOS = ("cold", "local", "mega")
PARTS = ("to_first_image_s", "import_s", "load_s", "first_image_s", "second_image_s")


def child(model: str, device: str, size: tuple[int, int], steps: int, cache: Path) -> dict:
    env = package_env(ZIMAGE_CACHE=str(cache))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "ZIMAGE_COMPILE_CACHE"):
        env.pop(name, None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, model, device, str(size[0]), str(size[1]), str(steps)],
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        return {"error": out.stderr[-3000:], "wall_s": wall}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": wall}


def one_repeat(model: str, device: str, size, steps: int, root: Path) -> dict:
    cache = root / "zimage-cache"
    runs = {"cold": child(model, device, size, steps, cache)}
    files = sorted((cache / "compile-artifacts").glob("*.zca"))
    saved = root / "artifacts"
    shutil.rmtree(saved, ignore_errors=True)
    saved.mkdir()
    for f in files:
        shutil.move(str(f), saved / f.name)
    runs["local"] = child(model, device, size, steps, cache)  # local caches only (it writes a file again: dropped)
    shutil.rmtree(cache / "compile-artifacts", ignore_errors=True)
    shutil.rmtree(cache / "inductor", ignore_errors=True)
    (cache / "compile-artifacts").mkdir(parents=True)
    for f in saved.iterdir():
        shutil.copy2(f, cache / "compile-artifacts" / f.name)
    mark = time.time()
    runs["mega"] = child(model, device, size, steps, cache)
    # kernels the mega process built itself: C++ (.so) on the CPU, which the artifact does not carry; on CUDA
    # Triton's kernels come in the artifact (inductor bundles them into its FX-graph entries)
    runs["mega"]["kernels_built"] = {ext: sum(1 for f in (cache / "inductor").rglob(f"*.{ext}")
                                              if f.stat().st_mtime >= mark) for ext in ("so", "cubin", "hsaco")}
    runs["artifact_bytes"] = sum(f.stat().st_size for f in saved.iterdir())
    shutil.rmtree(root)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    p.add_argument("--model", default=None, help="model folder (default: the full-size random one on CUDA, "
                                                 "the tiny random one on the CPU)")
    p.add_argument("--size", default=None, help="WxH of the image (default 1024x1024 on CUDA, 256x256 on the CPU)")
    p.add_argument("--steps", type=int, default=None, help="default 8 on CUDA (the Turbo recipe), 2 on the CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="bench-compile-cache-"))
    if args.model is not None:
        model = args.model
    elif gpu:
        from common import ensure_full_model

        model = str(ensure_full_model(DEFAULT_MODEL_DIR)[0])
    else:
        from zimage.weights.tiny import build_model_folder

        model = str(build_model_folder(work / "tiny"))
    size = tuple(int(v) for v in (args.size or ("1024x1024" if gpu else "256x256")).lower().split("x"))
    steps = args.steps or (8 if gpu else 2)

    repeats = []
    for i in range(args.repeats):
        r = one_repeat(model, device, size, steps, work / f"repeat-{i}")
        repeats.append(r)
        print(f"repeat {i}: " + ", ".join(f"{s} {r[s].get('to_first_image_s', float('nan')):.2f}s" for s in SCENARIOS),
              flush=True)
    shutil.rmtree(work, ignore_errors=True)

    medians = {}
    for s in SCENARIOS:
        ok = [r[s] for r in repeats if "error" not in r[s]]
        medians[s] = {k: round(statistics.median(run[k] for run in ok), 3) for k in PARTS} if ok else {
            "error": next(r[s]["error"] for r in repeats)}
    res = {"env": environment(), "model": model, "device": device, "size": list(size), "steps": steps,
           "repeats": args.repeats, "median": medians,
           "artifact_bytes": statistics.median(r["artifact_bytes"] for r in repeats), "runs": repeats}
    if not gpu:
        res["env"]["device"] = "cpu"
    for s in SCENARIOS:
        print(s, medians[s])
    print("wrote", write_json("compile_cache", res, args.out))


if __name__ == "__main__":
    main()
