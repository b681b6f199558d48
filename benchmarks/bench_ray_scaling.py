"""Scaling of the Ray Serve deployment on CPUs: throughput with N engine replicas against one, on the tiny model
with one torch thread per replica (a replica is one core's worth of work), 8 concurrent clients.

    python benchmarks/bench_ray_scaling.py                   # 1 vs 2 replicas, interleaved rounds
    python benchmarks/bench_ray_scaling.py --replicas 1,2 --rounds 3 --steps 20 --requests 48

Each round deploys the application with each replica count in turn (deploy, warm up, timed run, remove), so a
machine whose load drifts affects every count alike; the ratio compares the counts' mean throughputs. The clients
POST /v1/images/generations (b64_json, the OpenAI default) through Serve's proxy and the ingress. Prints a table
and writes benchmarks/results/ray_scaling_cpu_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

from load_test import make_bodies
from ray_serving import cpu_info, deploy, load, start_ray, stop_ray, undeploy

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", default="1,2", help="replica counts to compare, the first is the baseline")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="timed requests per run")
    p.add_argument("--size", default="256x256")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=4, help="images per engine call in a replica")
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--max-time", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/ray_scaling_cpu_<date>.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",")]
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_ray_scaling: needs Ray Serve: pip install 'zimage[server,ray]'", file=sys.stderr)
        return 2
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args) | {"out": None},
              "machine": cpu_info(), "runs": []}
    # Ray's CPU accounting only: one per replica; each replica then runs one torch thread.
    url = start_ray(num_cpus=max(counts) + 1, env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    try:
        for r in range(args.rounds):
            for n in counts:
                deploy_args = {"model": args.model, "device": "cpu", "replicas": n, "torch_threads": 1,
                               "max_batch": args.max_batch, "warmup_size": args.size, "default_size": args.size,
                               "max_queue": 1000}
                ready_s = deploy(url, deploy_args)
                bodies = make_bodies(args.requests + 2 * n, args.size, args.steps)
                stats = load(url, bodies, args.clients, args.max_time, warm=2 * n)
                undeploy()
                stats.update(round=r, replicas=n, ready_s=ready_s)
                result["runs"].append(stats)
                print(f"round {r} replicas {n}: {stats['images_per_s']:.3f} images/s, p50 {stats['p50_s']:.2f}s, "
                      f"p99 {stats['p99_s']:.2f}s, failed {stats['failed']}, cpu {stats['cpu']}", flush=True)
    finally:
        stop_ray()
    summarise(result, counts)
    out = args.out or RESULTS / f"ray_scaling_cpu_{datetime.now().strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["failed"] == 0 and r["not_sent"] == 0 for r in result["runs"]) else 1


def summarise(result, counts):
    by = {n: [r for r in result["runs"] if r["replicas"] == n] for n in counts}
    summary = {}
    for n, runs in by.items():
        summary[n] = {"images_per_s_mean": statistics.fmean(r["images_per_s"] for r in runs),
                      "images_per_s_each": [round(r["images_per_s"], 4) for r in runs],
                      "p50_s_median": statistics.median(r["p50_s"] for r in runs),
                      "p99_s_median": statistics.median(r["p99_s"] for r in runs),
                      "failed": sum(r["failed"] for r in runs),
                      "others_cores_each": [r["cpu"].get("others_cores") for r in runs]}
    base = summary[counts[0]]["images_per_s_mean"]
    for n in counts:
        summary[n]["throughput_vs_first"] = summary[n]["images_per_s_mean"] / base
    result["summary"] = {str(n): s for n, s in summary.items()}
    print(f"\n{'replicas':>8}{'images/s (mean)':>17}{'each run':>22}{'p50 s':>8}{'p99 s':>8}{'failed':>8}{'vs 1st':>8}")
    for n, s in summary.items():
        each = ", ".join(f"{x:.3f}" for x in s["images_per_s_each"])
        print(f"{n:>8}{s['images_per_s_mean']:>17.3f}{each:>22}{s['p50_s_median']:>8.2f}{s['p99_s_median']:>8.2f}"
              f"{s['failed']:>8}{s['throughput_vs_first']:>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
