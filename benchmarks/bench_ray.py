"""Ray Serve with one engine replica against `zimage serve`, on one GPU: the cost of the cluster layer.

    python benchmarks/bench_ray.py                       # full-size random weights, 1024x1024, 8 steps (the Turbo recipe), 8 clients
    python benchmarks/bench_ray.py --rounds 2 --requests 64

Needs zimage importable from this checkout with the server and ray extras (pip install -e '.[server,ray]' after
PyTorch's CUDA build). The full-size random model (the published shapes and layout) is written by
`zimage make-tiny --full-size --device cuda` into --model (default $ZIMAGE_BENCH_MODEL or /tmp/zimage-full) if it
is not there; this process itself never touches the GPU, so each server has it to itself.

Each round runs, one after the other on the same GPU: `zimage serve` (python -m zimage.server, max batch 8,
warmed up at the size) and the Ray application (ZImageIngress + one ZImageEngine replica with num_gpus=1, batches
of up to 8 through @serve.batch), each loaded, warmed, sent `--clients` untimed requests, then the timed ones
(OpenAI's POST /v1/images/generations, b64_json), then stopped. The targets (issue 17): Ray's throughput >= 0.95x
zimage serve's, its p99 latency within 10%. Prints a table, writes benchmarks/results/ray_vs_serve_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from common import DEFAULT_MODEL_DIR, REPO, package_env
from load_test import make_bodies
from ray_serving import deploy, load, start_ray, start_zimage_serve, stop_process, stop_ray, undeploy

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR),
                   help="full-size model folder, built if absent (or tiny-random, for a CPU smoke run)")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run: --model tiny-random)")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=64, help="timed requests per run")
    p.add_argument("--rounds", type=int, default=1, help="serve then ray, this many times")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-time", type=float, default=1200.0)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/ray_vs_serve_<gpu>_<date>.json)")
    return p.parse_args(argv)


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0].replace(" ", "-")
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown-gpu"


def ensure_model(model: str) -> None:
    folder = Path(model)
    if model == "tiny-random" or (folder / "model_index.json").is_file():
        return
    print(f"writing the full-size random model to {folder} ...", flush=True)
    subprocess.run([sys.executable, "-m", "zimage", "make-tiny", str(folder), "--full-size", "--device", "cuda"],
                   check=True, env=package_env(REPO))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_ray: needs Ray Serve: pip install -e '.[server,ray]'", file=sys.stderr)
        return 2
    from zimage.server.launch import free_port

    ensure_model(args.model)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "gpu": gpu_name() if args.device.startswith("cuda") else "cpu",
              "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    n_bodies = args.clients + args.requests
    logs = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    url = start_ray(num_gpus=1 if args.device.startswith("cuda") else 0, env={"TOKENIZERS_PARALLELISM": "false"})
    try:
        for r in range(args.rounds):
            bodies = make_bodies(n_bodies, args.size, args.steps)
            for b in bodies:  # distinct prompts per round and side: no prompt-embedding cache shared
                b["prompt"] += f", round {r}"
            port = free_port()
            proc, ready_s = start_zimage_serve(args.model, port, [
                "--device", args.device, "--max-batch", str(args.max_batch), "--warmup-size", args.size,
                "--default-size", args.size],
                logs / f"serve-{r}.log")
            try:
                stats = load(f"http://127.0.0.1:{port}", bodies, args.clients, args.max_time, warm=args.clients)
            finally:
                stop_process(proc)
            result["runs"].append({"server": "zimage serve", "round": r, "ready_s": ready_s, **stats})
            report(result["runs"][-1])

            bodies = [dict(b, prompt=b["prompt"] + ", ray") for b in bodies]
            ready_s = deploy(url, {"model": args.model, "device": args.device, "replicas": 1,
                                   "gpus": 1 if args.device.startswith("cuda") else 0, "max_batch": args.max_batch,
                                   "warmup_size": args.size, "default_size": args.size,
                                   "max_queue": max(64, n_bodies)})
            try:
                stats = load(url, bodies, args.clients, args.max_time, warm=args.clients)
            finally:
                undeploy()
            result["runs"].append({"server": "ray serve, 1 replica", "round": r, "ready_s": ready_s, **stats})
            report(result["runs"][-1])
    finally:
        stop_ray()
    summarise(result)
    out = args.out or RESULTS / f"ray_vs_serve_{result['gpu']}_{datetime.now().strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}  (server logs in {logs})")
    return 0 if all(r["failed"] == 0 and r["not_sent"] == 0 for r in result["runs"]) else 1


def report(run: dict) -> None:
    print(f"round {run['round']} {run['server']:<22} {run['images_per_s']:.3f} images/s  p50 {run['p50_s']:.2f}s  "
          f"p99 {run['p99_s']:.2f}s  failed {run['failed']}  (ready after {run['ready_s']:.0f}s)", flush=True)


def summarise(result: dict) -> None:
    def side(name):
        runs = [r for r in result["runs"] if r["server"] == name]
        return {"images_per_s_mean": statistics.fmean(r["images_per_s"] for r in runs),
                "p50_s_median": statistics.median(r["p50_s"] for r in runs),
                "p99_s_median": statistics.median(r["p99_s"] for r in runs),
                "failed": sum(r["failed"] for r in runs)}

    serve, ray = side("zimage serve"), side("ray serve, 1 replica")
    result["summary"] = {"zimage_serve": serve, "ray_1_replica": ray,
                         "throughput_ratio": ray["images_per_s_mean"] / serve["images_per_s_mean"],
                         "p99_ratio": ray["p99_s_median"] / serve["p99_s_median"]}
    s = result["summary"]
    print(f"\n{result['gpu']}  {result['args']['size']}  {result['args']['steps']} steps  "
          f"{result['args']['clients']} clients")
    print(f"{'':24}{'images/s':>10}{'p50 s':>8}{'p99 s':>8}{'failed':>8}")
    for name, d in (("zimage serve", serve), ("ray serve, 1 replica", ray)):
        print(f"{name:<24}{d['images_per_s_mean']:>10.3f}{d['p50_s_median']:>8.2f}{d['p99_s_median']:>8.2f}"
              f"{d['failed']:>8}")
    print(f"throughput ray / serve {s['throughput_ratio']:.3f} (target >= 0.95); "
          f"p99 ray / serve {s['p99_ratio']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    sys.exit(main())
