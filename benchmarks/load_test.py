"""Server load test: N concurrent clients against a zimage server on loopback, compared with the engine alone.

    python benchmarks/load_test.py                                   # tiny model on CPU, in-process server
    python benchmarks/load_test.py --model /models/Z-Image-Turbo --size 1024x1024 --steps 9 --requests 64
    python benchmarks/load_test.py --url http://127.0.0.1:8000 --api-key KEY   # an already running server

In-process (no --url), the same loaded engine serves both measurements, in this order:
  1. baseline: the same requests through `engine.generate`, one after the other (images/s), measured before
     AND after the server run; the ratio uses their mean (shared or throttled CPUs drift over a minute);
  2. server: uvicorn on a free loopback port in a thread, `--clients` threads each POSTing
     /v1/images/generations (b64_json, the OpenAI default) until `--requests` are done or `--max-time` passes.
Prints a table and writes benchmarks/results/load_<device>_<date>.json. Traffic goes to loopback only (or to
--url, which you choose); the count and the time are bounded. Clients use only the standard library; the
in-process server needs fastapi + uvicorn (pip install 'zimage[server]'), and the script says so if missing.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", help="target this running server instead of starting one (no baseline then)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--speed", default="auto")
    p.add_argument("--size", default="256x256", help="WIDTHxHEIGHT (default: %(default)s)")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=32, help="total requests (bounded)")
    p.add_argument("--max-time", type=float, default=300.0, help="seconds; clients stop sending after this")
    p.add_argument("--max-batch", type=int, default=8, help="server batching limit, in images")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: results/load_<device>_<date>.json)")
    return p.parse_args(argv)


def percentile(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def make_bodies(n, size, steps):
    return [{"prompt": f"load test image {i}: a harbour at dawn, detailed", "size": size, "seed": 1000 + i,
             "num_inference_steps": steps, "response_format": "b64_json"} for i in range(n)]


def run_baseline(engine, bodies):
    from zimage.request import GenerateRequest
    from zimage.sizes import parse_size

    reqs = []
    for b in bodies:
        w, h = parse_size(b["size"])
        reqs.append(GenerateRequest(prompts=(b["prompt"],), width=w, height=h, steps=b["num_inference_steps"],
                                    seed=b["seed"]))
    engine.generate(reqs[0])  # warm
    t0 = time.perf_counter()
    for r in reqs:
        engine.generate(r)
    seconds = time.perf_counter() - t0
    return {"images": len(reqs), "seconds": seconds, "images_per_s": len(reqs) / seconds}


def run_clients(url, bodies, clients, max_time, api_key=None):
    """`clients` threads take bodies from a shared list; each POST is timed (seconds)."""
    lock = threading.Lock()
    todo = list(bodies)
    latencies, failures = [], []
    deadline = time.monotonic() + max_time
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"

    def client():
        while time.monotonic() < deadline:
            with lock:
                if not todo:
                    return
                body = todo.pop(0)
            req = urllib.request.Request(url + "/v1/images/generations", json.dumps(body).encode(), headers)
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=max(10.0, deadline - time.monotonic() + 60)) as r:
                    data = json.loads(r.read())
                base64.b64decode(data["data"][0]["b64_json"], validate=True)
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                with lock:
                    failures.append(repr(e)[:200])

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    return {"images": len(latencies), "seconds": seconds, "images_per_s": len(latencies) / seconds,
            "failed": len(failures), "not_sent": len(todo), "failures": failures[:5],
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "mean_s": statistics.fmean(latencies) if latencies else float("nan")}


def device_name(engine) -> str:
    if engine is None:
        return "remote"
    dev = engine.device
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev).replace(" ", "-")
    return f"cpu-{platform.machine()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    bodies = make_bodies(args.requests, args.size, args.steps)
    engine = server = None
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"}}
    if args.url:
        url = args.url.rstrip("/")
    else:
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as e:
            print(f"load_test: the in-process server needs fastapi and uvicorn ({e.name} is missing): "
                  "pip install 'zimage[server]', or point --url at a running server", file=sys.stderr)
            return 2
        from zimage.engine.config import EngineConfig
        from zimage.engine.engine import Engine
        from zimage.server.launch import start_in_thread
        from zimage.server.settings import ServerSettings
        from zimage.sizes import parse_size
        import tempfile

        engine = Engine.load(EngineConfig(model=args.model, device=args.device, dtype=args.dtype, speed=args.speed))
        result["engine"] = engine.describe()
        print(f"baseline: {len(bodies)} requests through engine.generate, one by one ...", flush=True)
        result["baseline"] = run_baseline(engine, bodies)
        data_dir = Path(tempfile.mkdtemp(prefix="zimage-load-"))
        settings = ServerSettings(data_dir=data_dir, port=0, max_batch=args.max_batch, max_queue=max(64, args.clients),
                                  warmup_size=parse_size(args.size), warmup_steps=args.steps, previews=False,
                                  api_key=args.api_key)
        server = start_in_thread(settings, engine=engine)
        url = server.url
    print(f"server: {len(bodies)} requests from {args.clients} clients to {url} ...", flush=True)
    try:
        result["server"] = run_clients(url, bodies, args.clients, args.max_time, args.api_key)
    finally:
        if server is not None:
            server.stop()
    if engine is not None:
        print("baseline again, after the server run ...", flush=True)
        before, after = result.pop("baseline"), run_baseline(engine, bodies)
        seconds = (before["seconds"] + after["seconds"]) / 2
        result["baseline"] = {"images": before["images"], "seconds": seconds, "images_per_s": before["images"] / seconds,
                              "images_per_s_before": before["images_per_s"], "images_per_s_after": after["images_per_s"]}
    s, b = result["server"], result.get("baseline")
    if b:
        result["throughput_ratio"] = s["images_per_s"] / b["images_per_s"]
    result["device"] = device_name(engine)
    print_table(result)
    out = args.output or RESULTS / f"load_{result['device']}_{datetime.now().strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0 if s["failed"] == 0 and s["not_sent"] == 0 else 1


def print_table(r):
    s, b = r["server"], r.get("baseline")
    print(f"\ndevice {r['device']}  size {r['args']['size']}  steps {r['args']['steps']}  "
          f"clients {r['args']['clients']}  max batch {r['args']['max_batch']}")
    print(f"{'':28}{'images':>8}{'seconds':>10}{'images/s':>10}{'p50 s':>9}{'p99 s':>9}{'failed':>8}")
    if b:
        print(f"{'engine alone (sequential)*':28}{b['images']:>8}{b['seconds']:>10.2f}{b['images_per_s']:>10.3f}"
              f"{'':>9}{'':>9}{'':>8}")
    print(f"{'server, concurrent clients':28}{s['images']:>8}{s['seconds']:>10.2f}{s['images_per_s']:>10.3f}"
          f"{s['p50_s']:>9.3f}{s['p99_s']:>9.3f}{s['failed']:>8}")
    if b:
        print(f"throughput ratio server / engine alone: {r['throughput_ratio']:.3f}   (*mean of before and after: "
              f"{b['images_per_s_before']:.3f} and {b['images_per_s_after']:.3f} images/s)")


if __name__ == "__main__":
    sys.exit(main())
