"""Helpers of the Ray Serve benchmarks (bench_ray.py on a GPU, bench_ray_scaling.py on CPUs): a local Ray
cluster whose workers import this checkout, the zimage application deployed and removed, `zimage serve` in a
subprocess, and the load itself (load_test.run_clients: concurrent clients POSTing /v1/images/generations)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import REPO, package_env

APP = "zimage"


def start_ray(num_cpus: int | None = None, num_gpus: int | None = None, env: dict | None = None) -> str:
    """A local Ray cluster and Serve's proxy on a free loopback port; returns the proxy's URL."""
    import ray
    from ray import serve

    from zimage.deploy.ray_cli import worker_pythonpath
    from zimage.server.launch import free_port

    temp = tempfile.mkdtemp(prefix="zray-")  # Ray's socket paths must stay under 107 characters
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath(), **(env or {})}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def stop_ray() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def deploy(url: str, args: dict, timeout: float = 1800.0) -> float:
    """Deploy the application with builder `args`; returns the seconds until /health said ready."""
    from ray import serve

    from zimage.deploy.ray_app import app

    t0 = time.perf_counter()
    serve.run(app(args), name=APP, route_prefix="/", blocking=False)
    wait_healthy(url, timeout)
    return time.perf_counter() - t0


def undeploy() -> None:
    from ray import serve

    serve.delete(APP)


def start_zimage_serve(model: str, port: int, extra: list[str], log: Path, timeout: float = 1800.0):
    """`python -m zimage.server` (what `zimage serve` runs) on this checkout; returns (process, seconds to ready)."""
    data = tempfile.mkdtemp(prefix="zimage-bench-")
    cmd = [sys.executable, "-m", "zimage.server", "--model", model, "--port", str(port), "--data-dir", data,
           "--no-previews", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=package_env(REPO))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, time.perf_counter() - t0


def wait_healthy(url: str, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s")


def stop_process(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def load(url: str, bodies: list[dict], clients: int, max_time: float, warm: int) -> dict:
    """The first `warm` bodies untimed (every replica's first calls), then the rest timed. Every body has its own
    prompt, so no prompt-embedding cache flatters the timed run."""
    from load_test import run_clients

    if warm:
        run_clients(url, bodies[:warm], min(clients, warm), max_time)
    with CpuMeter() as cpu:
        stats = run_clients(url, bodies[warm:], clients, max_time)
    return {**stats, "cpu": cpu.result}


def cpu_info() -> dict:
    return {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}


class CpuMeter:
    """CPU used during a run, in cores: by the whole machine, by this process and its descendants (Ray's
    processes, the replicas, a server subprocess), and by everything else: a shared machine's other load, which
    a scaling figure must be read against. Linux /proc only; elsewhere it reports nothing."""

    def __enter__(self):
        self.result: dict = {}
        self._t0, self._busy0 = time.monotonic(), _machine_busy_s()
        self._ours0, self._each0 = _tree_cpu_s(os.getpid())
        return self

    def __exit__(self, *exc):
        if self._busy0 is None:
            return
        seconds = time.monotonic() - self._t0
        busy = (_machine_busy_s() - self._busy0) / seconds
        ours_s, each = _tree_cpu_s(os.getpid())
        ours = (ours_s - self._ours0) / seconds
        by_name: dict[str, float] = {}
        for pid, (name, cpu_s) in each.items():
            used = cpu_s - self._each0.get(pid, (name, 0.0))[1]
            by_name[name] = by_name.get(name, 0.0) + used / seconds
        self.result = {"machine_cores": round(busy, 3), "ours_cores": round(ours, 3),
                       "others_cores": round(max(0.0, busy - ours), 3),
                       # which of our processes used it (Ray names its workers: ray::ServeReplica:<app>:<deployment>,
                       # ray::ProxyActor, ...; "bench" is this process: the clients), those over 0.005 cores
                       "by_process": {k: round(v, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])
                                      if v > 0.005}}


def _machine_busy_s() -> float | None:
    try:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root: int) -> tuple[float, dict[int, tuple[str, float]]]:
    """utime + stime of `root` and its live descendants (those that ended during a run are not counted; in these
    benchmarks every process of a run lives through it), and each one's {pid: (name, seconds)}."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(stat[1])
        children.setdefault(ppid, []).append(pid)
        times[pid] = (int(stat[11]) + int(stat[12])) / tick
    total, each, todo = 0.0, {}, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0.0)
        each[pid] = ("bench" if pid == root else _process_name(pid), times.get(pid, 0.0))
        todo.extend(children.get(pid, []))
    return total, each


def _process_name(pid: int) -> str:
    """The first word of a process's command line (Ray sets its workers' to ray::<actor>), its path stripped."""
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].decode(errors="replace").split(" ")[0]
    except OSError:
        return "?"
    return argv.rsplit("/", 1)[-1] or "?"
