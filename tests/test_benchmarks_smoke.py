"""The GPU benchmark scripts start and explain themselves (their figures come from the GPU machine; see
BENCHMARKS.md). The load test has its own end-to-end test in tests/server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["bench_speed.py", "bench_compile.py", "bench_memory.py", "bench_forward_variants.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_help(script):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "--out" in out.stdout


def test_timing_helpers_report_medians():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    timed = common.timed
    calls = []
    median, times, last = timed(lambda: calls.append(1) or len(calls), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and last == 5
    assert min(times) <= median <= max(times)
