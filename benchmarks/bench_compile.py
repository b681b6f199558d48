"""Compile cost of `--speed compile` against eager, in fresh processes, and the image count where it pays.

    python benchmarks/bench_compile.py [--model DIR] [--runs 2] [--images 6] [--out DIR]

Each child process: import, (compile: import dynamo and inductor, timed apart: the first torch.compile call would),
Engine.load(speed=eager|compile), then --images 1024x1024 images of 8 forwards one after another (new prompt each): seconds to the first image from process start, and the median of the later ones (steady).
Processes: eager x --runs, compile with an empty inductor cache x 1 (a new machine), compile with that cache warm x
--runs (every later process on the machine). Break-even: the image count n where both take as long,
n = 1 + (compile to first - eager to first) / (eager steady - compile steady), for a warm and an empty cache; the
CLI's `--speed auto` (zimage.speed.modes.COMPILE_BREAK_EVEN_IMAGES) follows the warm one. Prints; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_MODEL_DIR, ensure_full_model, environment, package_env, write_json

CHILD = r"""
import json, statistics, sys, time
t0 = time.perf_counter()
import torch
from zimage import Engine, GenerateRequest
t_import = time.perf_counter()
if sys.argv[2] == "compile":  # what the first torch.compile call imports, timed apart from the load
    import torch._dynamo, torch._inductor.compile_fx  # noqa: E401
t_compiler = time.perf_counter()
engine = Engine.load(model=sys.argv[1], speed=sys.argv[2])
torch.cuda.synchronize()
t_load = time.perf_counter()
times = []
for i in range(int(sys.argv[3])):
    t = time.perf_counter()
    engine.generate(GenerateRequest(prompts=(f"a red fox in the snow, shot {i}",), width=1024, height=1024, seed=i))
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
print(json.dumps({"import_s": t_import - t0, "compiler_import_s": t_compiler - t_import,
                  "load_s": t_load - t_compiler, "first_image_s": times[0],
                  "steady_s": statistics.median(times[1:]), "image_s": times,
                  "to_first_image_s": t_load - t0 + times[0]}))
"""


def child(model: Path, mode: str, cache: str, images: int) -> dict:
    env = package_env(TORCHINDUCTOR_CACHE_DIR=cache, ZIMAGE_CACHE=cache)  # zimage's artifact file there too
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), mode, str(images)], env=env, capture_output=True,
                         text=True)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    keys = ("import_s", "compiler_import_s", "load_s", "first_image_s", "steady_s", "to_first_image_s")
    return {k: statistics.median(r[k] for r in ok) for k in keys} if ok else {}


def break_even(compiled: dict, eager: dict) -> float | None:
    """Images from which a compiling process finishes no later than an eager one (None: compile never pays)."""
    saving = eager["steady_s"] - compiled["steady_s"]
    if saving <= 0:
        return None
    return 1 + max(0.0, compiled["to_first_image_s"] - eager["to_first_image_s"]) / saving


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--runs", type=int, default=2, help="eager and warm-cache compile processes each")
    p.add_argument("--images", type=int, default=6, help="images per process (>= 2)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    folder, _ = ensure_full_model(args.model)
    cache = tempfile.mkdtemp(prefix="zimage-cache-")
    res = {"env": environment(), "images_per_process": args.images, "steps": 8, "size": "1024x1024"}
    res["eager_runs"] = [child(folder, "eager", cache, args.images) for _ in range(args.runs)]
    res["compile_empty_cache"] = child(folder, "compile", cache, args.images)
    res["compile_warm_runs"] = [child(folder, "compile", cache, args.images) for _ in range(args.runs)]
    eager, warm, cold = medians(res["eager_runs"]), medians(res["compile_warm_runs"]), medians(
        [res["compile_empty_cache"]])
    res["medians"] = {"eager": eager, "compile_warm": warm, "compile_empty_cache": cold}
    if eager and warm and cold:
        res["break_even_images"] = {"warm_cache": break_even(warm, eager), "empty_cache": break_even(cold, eager)}
    for k, v in res["medians"].items():
        print(k, {n: round(x, 3) for n, x in v.items()})
    print("break-even images:", res.get("break_even_images"))
    errors = [r["error"] for r in res["eager_runs"] + res["compile_warm_runs"] + [res["compile_empty_cache"]]
              if "error" in r]
    if errors:
        print("errors:", errors[0][-1500:])
    print("wrote", write_json("compile", res, args.out))


if __name__ == "__main__":
    main()
