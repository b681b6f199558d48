"""Compile cost of `--speed compile`, in a first process (empty inductor cache) and a second one (warm cache).

    python benchmarks/bench_compile.py [--model DIR] [--out DIR]

Each process: import, Engine.load(speed=compile), one 1024x1024 image (compiles), a second image (warm).
Also an eager process for comparison. Reports seconds per part and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import DEFAULT_MODEL_DIR, ensure_full_model, environment, package_env, write_json

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
from zimage import Engine, GenerateRequest
t_import = time.perf_counter()
engine = Engine.load(model=sys.argv[1], speed=sys.argv[2])
torch.cuda.synchronize()
t_load = time.perf_counter()
req = lambda i: GenerateRequest(prompts=(f"a red fox in the snow, shot {i}",), width=1024, height=1024, steps=9, seed=i)
engine.generate(req(0)); torch.cuda.synchronize()
t_first = time.perf_counter()
engine.generate(req(1)); torch.cuda.synchronize()
t_second = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "load_s": t_load - t_import, "first_image_s": t_first - t_load,
                  "second_image_s": t_second - t_first, "to_first_image_s": t_first - t0}))
"""


def child(model: Path, mode: str, cache: str) -> dict:
    env = package_env(TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), mode], env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    folder, _ = ensure_full_model(args.model)
    cache = tempfile.mkdtemp(prefix="inductor-")
    res = {"env": environment(), "eager": child(folder, "eager", cache),
           "compile_first_process": child(folder, "compile", cache),
           "compile_second_process": child(folder, "compile", cache)}
    for k, v in res.items():
        print(k, v)
    print("wrote", write_json("compile", res, args.out))


if __name__ == "__main__":
    main()
