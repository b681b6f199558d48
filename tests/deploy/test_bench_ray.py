"""The Ray benchmarks run: bench_ray.py end to end on the CPU (tiny model: `zimage serve` in a subprocess, then
the Ray application, each loaded, loaded with clients and stopped), bench_ray_scaling.py's arguments and table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


@pytest.mark.parametrize("script", ["bench_ray.py", "bench_ray_scaling.py"])
def test_help(script):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "--out" in out.stdout


@pytest.mark.slow
def test_bench_ray_runs_on_a_cpu(tmp_path):
    pytest.importorskip("ray.serve")
    out = tmp_path / "ray_vs_serve.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ray.py"), "--model", "tiny-random",
                          "--device", "cpu", "--size", "256x256", "--steps", "2", "--clients", "2", "--requests", "4",
                          "--out", str(out)], env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["server"] for r in result["runs"]] == ["zimage serve", "ray serve, 1 replica"]
    for r in result["runs"]:
        assert r["images"] == 4 and r["failed"] == 0 and r["p99_s"] >= r["p50_s"] > 0
        assert r["cpu"]["ours_cores"] > 0
    assert result["summary"]["throughput_ratio"] > 0 and "throughput ray / serve" in run.stdout


def test_scaling_summary_compares_with_the_first_count():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their siblings (load_test, ray_serving)
    try:
        import bench_ray_scaling
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    runs = [{"replicas": n, "images_per_s": v, "p50_s": 1.0, "p99_s": 2.0, "failed": 0, "cpu": {"others_cores": 0}}
            for n, v in [(1, 1.0), (2, 1.9), (1, 1.2), (2, 2.1)]]
    result = {"runs": runs}
    bench_ray_scaling.summarise(result, [1, 2])
    assert result["summary"]["2"]["throughput_vs_first"] == pytest.approx(2.0 / 1.1)
    assert result["summary"]["1"]["images_per_s_each"] == [1.0, 1.2]
