"""Helpers shared by the GPU benchmarks: the full-size random model, timing, JSON output.

Every benchmark warms up, synchronises the GPU around timed regions and reports medians; every figure is written
with its device, date, versions and command.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = Path(os.environ.get("ZIMAGE_BENCH_MODEL", "/tmp/zimage-full"))
PROMPT = ("a photograph of a red fox standing in fresh snow at golden hour, soft light, shallow depth of field, "
          "detailed fur")


def prompt_variant(i: int) -> str:
    """Distinct prompts of equal token count, so no prompt cache flatters a timing."""
    return f"{PROMPT}, shot {i:03d}"


def ensure_full_model(folder: Path = DEFAULT_MODEL_DIR) -> tuple[Path, float]:
    """The full-size random-weight folder in the published layout, built on the GPU once per machine."""
    if (folder / "model_index.json").is_file():
        return folder, 0.0
    from zimage.weights.tiny import build_model_folder

    t = time.perf_counter()
    build_model_folder(folder, full_size=True, device="cuda")
    return folder, time.perf_counter() - t


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float], object]:
    """(median seconds, all seconds, last result) of fn() with synchronisation around each call."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, out


def cuda_ms(fn, repeats: int = 10, warmup: int = 2, busy_ahead: bool = False) -> float:
    """Median milliseconds of fn() measured with CUDA events (host clock on a CPU-only machine).

    busy_ahead: keep the GPU busy (a ~1 ms spin) while the host queues the events and fn's kernels, so that the
    host's dispatch time is not counted, as it is on an idle GPU (~0.05 ms per cuDNN attention call: measured)."""
    import torch

    if not torch.cuda.is_available():
        return 1000 * timed(fn, repeats, warmup)[0]

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy_ahead:
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU cycles: longer than queueing a, fn() and b takes the host
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def environment() -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "command": " ".join(sys.argv)}
    try:
        import diffusers
        import transformers

        env.update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = "cpu"
    return env


def package_env(root: Path = REPO, **extra: str) -> dict:
    """os.environ for a child Python that imports zimage from `root` (this checkout, or another one for an A/B),
    ahead of what PYTHONPATH already holds (a --target install of diffusers on the GPU machine), plus `extra`."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def write_json(name: str, data: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = data.get("env", {}).get("device", "cpu").replace(" ", "-")
    day = data.get("env", {}).get("date", "")[:10]
    path = out_dir / f"{name}_{device}_{day}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def reset_peak():
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def free_cuda():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
