"""A/B of the cold start CLI between this checkout and another one (`--other DIR`, a copy of an earlier commit's
zimage package): `zimage -v generate` to PNG saved, with and without --converted-cache, interleaved fresh
processes, medians. JSON to $OUT (warm_start_ab_*).

Run at commit d0e2074 (the stand-in step on a side thread, since reverted) against e002612 (on the generating
thread): benchmarks/results/warm_start_ab_NVIDIA-H200_2026-11-30.json.

    mkdir -p .ab/old && git archive e002612 zimage | tar -x -C .ab/old   # then carry .ab to the GPU machine
    python3 benchmarks/experiments/warm_start_ab.py --other .ab/old --label-other "stand-in on the generating thread"
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from bench_memory import cli_run  # noqa: E402
from common import package_env  # noqa: E402


def main():
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("ZIMAGE_BENCH_MODEL", "/tmp/zimage-full"))
    ap.add_argument("--other", required=True, help="folder holding the other checkout's zimage package")
    ap.add_argument("--label-other", default="other")
    ap.add_argument("--label-this", default="this checkout")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    roots = {args.label_other: Path(args.other).resolve(), args.label_this: HERE.parents[1]}
    variants = {"": (), " --converted-cache": ("--converted-cache",)}
    for root in roots.values():  # each arm runs its own package (cli_run's cwd and PYTHONPATH pick it)
        where = subprocess.run([sys.executable, "-c", "import zimage; print(zimage.__file__)"], cwd=root,
                               env=package_env(root), capture_output=True, text=True, check=True).stdout.strip()
        if not Path(where).is_relative_to(root):
            raise SystemExit(f"{root} runs the zimage package at {where}")
    for root in roots.values():  # unmeasured: writes the converted cache, fills the page cache
        cli_run(args.model, str(out), "--converted-cache", root=root)
    runs = {label + v: [] for label in roots for v in variants}
    for _ in range(args.repeats):
        for label, root in roots.items():
            for v, flags in variants.items():
                r = cli_run(args.model, str(out), *flags, root=root)
                if "error" in r:
                    raise SystemExit(f"{label}{v}: {r['error']}")
                runs[label + v].append(r)
                print(f"{label + v}: saved {r['saved_s']:.2f}s import {r['import_torch_s']}s "
                      f"{r['stderr_tail']}", flush=True)
    table = {}
    for name, rs in runs.items():
        table[name] = {"saved_s": statistics.median(r["saved_s"] for r in rs),
                       "without_import_s": statistics.median(r["saved_s"] - r["import_torch_s"] for r in rs),
                       "saved_runs_s": [round(r["saved_s"], 3) for r in rs],
                       "median_timeline": sorted(rs, key=lambda r: r["saved_s"])[len(rs) // 2]["timeline"]}
        print(f"{name:60s} saved {table[name]['saved_s']:.2f}s, without import {table[name]['without_import_s']:.2f}s")
    name = torch.cuda.get_device_name().replace(" ", "-")
    (out / f"warm_start_ab_{name}.json").write_text(json.dumps({"model": args.model, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
