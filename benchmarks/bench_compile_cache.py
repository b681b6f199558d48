"""Time to the first compiled image in a fresh process, with zimage's precompiled functions and without them.

    python benchmarks/bench_compile_cache.py [--device auto|cpu|cuda] [--model DIR] [--size WxH] [--repeats 3]
                                             [--images 4] [--out DIR]

Each repeat uses fresh zimage caches (ZIMAGE_CACHE, temporary folders; TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR unset, so inductor and Triton use zimage's folder in them) and runs child processes, each
`import -> Engine.load(speed=compile) -> --images images` (the first, then steady ones):

precompiled functions on (zimage.speed.precompiled, the default):
- cold:    empty caches (compiles everything ahead of time; writes the functions, inductor's entries, the artifact)
- warm:    everything `cold` left (a second process on the same machine)
- files:   only zimage's compile-artifacts folder from `cold` (functions and artifact file), inductor's folder
           removed (a fresh machine given those files)
torch.compile alone (ZIMAGE_PRECOMPILED=0; zimage before them), in caches of its own:
- tc-cold, tc-local (inductor's local caches, no artifact file), tc-mega (the artifact file only)

Reports the median seconds to the first image (from the child's start) and its parts, the steady image time (both
paths run static-shape graphs at one size: they should match), the compile counters,
and for each run the first image's phases and dynamo's / inductor's own timers. On CUDA the model is the full-size
random one (benchmarks/common.py); on the CPU the tiny random model at 256x256, 2 steps.
"""

from __future__ import annotations

import argparse
import functools
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
import json, statistics, sys, time
t0 = time.perf_counter()
import torch
from torch._dynamo.utils import counters
from zimage.engine.engine import Engine
from zimage.request import GenerateRequest
t_import = time.perf_counter()
model, device, width, height, steps, images = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
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
later = []
for i in range(images - 1):
    t = time.perf_counter()
    engine.generate(GenerateRequest(prompts=(f"a red fox in the snow, take {i + 2}",), width=width, height=height,
                                    steps=steps, seed=2 + i))
    sync()
    later.append(time.perf_counter() - t)
a, pc = engine.speed_setup.artifacts, engine.speed_setup.precompiled
calls = {}
for m in list(engine.parts.transformer.blocks()) + [engine.parts.vae.decoder]:
    for k, v in getattr(m._compiled_call_impl, "calls", {}).items():
        calls[k] = calls.get(k, 0) + v
print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "first_image_s": t_first - t_load,
                  "second_image_s": later[0], "steady_image_s": statistics.median(later),
                  "to_first_image_s": t_first - t0,
                  "first_image_phases": {k: round(v, 3) for k, v in first.timings.items()},
                  "compile_parts": compile_parts, "dynamo_graphs": counters["stats"].get("unique_graphs", 0),
                  "artifacts": None if a is None else {"status": a.status, "loaded": a.loaded, "saves": a.saves},
                  "precompiled": None if pc is None else {"status": pc.status, "seconds": pc.seconds,
                                                          "calls": calls},
                  "fxgraph": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph")},
                  "aot_autograd": {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}}))
"""

SCENARIOS = ("cold", "warm", "files", "tc-cold", "tc-local", "tc-mega")
PARTS = ("to_first_image_s", "import_s", "load_s", "first_image_s", "second_image_s", "steady_image_s")


def child(model: str, device: str, size: tuple[int, int], steps: int, images: int, cache: Path,
          precompiled: bool) -> dict:
    env = package_env(ZIMAGE_CACHE=str(cache))
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "ZIMAGE_COMPILE_CACHE", "ZIMAGE_PRECOMPILED"):
        env.pop(name, None)
    if not precompiled:
        env["ZIMAGE_PRECOMPILED"] = "0"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, model, device, str(size[0]), str(size[1]), str(steps),
                          str(images)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        return {"error": out.stderr[-3000:], "wall_s": wall}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": wall}


def _built_since(cache: Path, mark: float) -> dict:
    """Kernels a process built itself: C++ (.so) on the CPU, which no artifact carries; Triton's on CUDA."""
    return {ext: sum(1 for f in (cache / "inductor").rglob(f"*.{ext}") if f.stat().st_mtime >= mark)
            for ext in ("so", "cubin", "hsaco")}


def one_repeat(model: str, device: str, size, steps: int, images: int, root: Path) -> dict:
    run = functools.partial(child, model, device, size, steps, images)
    # precompiled functions on
    cache = root / "zimage-cache"
    runs = {"cold": run(cache, True)}
    runs["warm"] = run(cache, True)
    shutil.rmtree(cache / "inductor", ignore_errors=True)
    runs["files_bytes"] = sum(f.stat().st_size for f in (cache / "compile-artifacts").rglob("*") if f.is_file())
    mark = time.time()
    runs["files"] = run(cache, True)
    runs["files"]["kernels_built"] = _built_since(cache, mark)
    # torch.compile alone
    cache = root / "tc-cache"
    runs["tc-cold"] = run(cache, False)
    saved = root / "artifacts"
    saved.mkdir()
    for f in sorted((cache / "compile-artifacts").glob("*.zca")):
        shutil.move(str(f), saved / f.name)
    runs["tc-local"] = run(cache, False)  # local caches only (it writes a file again: dropped)
    shutil.rmtree(cache / "compile-artifacts", ignore_errors=True)
    shutil.rmtree(cache / "inductor", ignore_errors=True)
    (cache / "compile-artifacts").mkdir(parents=True)
    for f in saved.iterdir():
        shutil.copy2(f, cache / "compile-artifacts" / f.name)
    mark = time.time()
    runs["tc-mega"] = run(cache, False)
    runs["tc-mega"]["kernels_built"] = _built_since(cache, mark)
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
    p.add_argument("--images", type=int, default=4, help="images per process (>= 2: the first, then steady ones)")
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
        r = one_repeat(model, device, size, steps, args.images, work / f"repeat-{i}")
        repeats.append(r)
        print(f"repeat {i}: " + ", ".join(f"{s} {r[s].get('to_first_image_s', float('nan')):.2f}s" for s in SCENARIOS),
              flush=True)
        # written after every repeat (the same file): a run cut short keeps what it measured
        path = write_json("compile_cache", summary(repeats, args, model, device, size, steps, gpu), args.out)
    shutil.rmtree(work, ignore_errors=True)
    for s, m in summary(repeats, args, model, device, size, steps, gpu)["median"].items():
        print(s, m)
    print("wrote", path)


def summary(repeats, args, model, device, size, steps, gpu) -> dict:
    medians = {}
    for s in SCENARIOS:
        ok = [r[s] for r in repeats if "error" not in r[s]]
        medians[s] = {k: round(statistics.median(run[k] for run in ok), 3) for k in PARTS} if ok else {
            "error": next(r[s]["error"] for r in repeats)}
    res = {"env": environment(), "model": model, "device": device, "size": list(size), "steps": steps,
           "repeats": len(repeats), "images": args.images, "median": medians,
           "artifact_bytes": statistics.median(r["artifact_bytes"] for r in repeats),
           "files_bytes": statistics.median(r["files_bytes"] for r in repeats), "runs": repeats}
    if not gpu:
        res["env"]["device"] = "cpu"
    return res


if __name__ == "__main__":
    main()
