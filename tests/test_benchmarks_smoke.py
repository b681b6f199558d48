"""The GPU benchmark scripts start and explain themselves (their figures come from the GPU machine; see
BENCHMARKS.md). The load test has its own end-to-end test in tests/server."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The repository first, then whatever the caller already had on the path (a --target install of diffusers).
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
SCRIPTS = ["bench_speed.py", "bench_compile.py", "bench_memory.py", "bench_forward_variants.py", "bench_profile.py",
           "bench_lora.py", "bench_image.py", "bench_compile_cache.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_help(script):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
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


def _load_benchmark(name: str):
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling common.py
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


@pytest.mark.parametrize("name, category", [
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>(...)", "gemm"),
    ("triton_tem_fused_mm_0", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false> >(Flash_fwd_params)",
     "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)", "attention"),
    ("triton_poi_fused__scaled_dot_product_cudnn_attention_add_mul_3", "triton"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", "triton"),
    ("triton_per_fused_mul_rsqrt_2", "triton"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, ...>", "other"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float>>>", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
    ("aten::mm", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::mul", "other"),
])
def test_profile_categorize(name, category):
    assert _load_benchmark("bench_profile").categorize(name) == category


def test_profile_breakdown_sums_to_the_forward():
    bench = _load_benchmark("bench_profile")
    events = [("nvjet_a", 3000.0), ("nvjet_a", 3000.0), ("cudnn_sdpa", 2000.0), ("triton_poi_fused_0", 500.0),
              ("elementwise_kernel", 500.0)]  # two forwards' kernels, in microseconds
    b = bench.breakdown(events, forwards=2, wall_ms=5.0)
    assert b["kernel_ms_per_forward"] == 4.5 and abs(b["idle_ms_per_forward"] - 0.5) < 1e-9
    cats = b["categories"]
    assert (cats["gemm"]["ms"], cats["attention"]["ms"], cats["triton"]["ms"], cats["other"]["ms"]) == (3, 1, .25, .25)
    assert abs(sum(c["pct_of_forward"] for c in cats.values()) + b["idle_pct_of_forward"] - 100) < 1e-9
    assert b["top_kernels"][0] == {"name": "nvjet_a", "category": "gemm", "calls_per_forward": 1.0,
                                   "ms_per_forward": 3.0}


def test_profile_script_runs_on_cpu(tiny_folder, tmp_path):
    """The whole script on the tiny model on CPU: timings, the op breakdown, rates and the floor, JSON written."""
    import json

    env = dict(os.environ, PYTHONPATH=PYTHONPATH, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "bench_profile.py", "--model", str(tiny_folder), "--device", "cpu",
                          "--size", "256x256", "--modes", "eager", "--repeats", "2", "--cudagraphs",
                          "--out", str(tmp_path)], cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("profile-256x256_*.json")
    res = json.loads(path.read_text())
    run = res["modes"]["eager"]
    assert run["forward_ms"] > 0 and run["cudagraphs"] == "skipped: no CUDA"
    prof = run["profile"]
    assert prof["kernel_ms_per_forward"] > 0 and prof["categories"]["gemm"]["ms"] > 0
    assert 0 < len(prof["top_kernels"]) <= 15
    assert res["tokens"]["image_tokens_padded"] == 256 and res["tokens"]["caption_tokens_padded"] % 32 == 0
    assert res["rates"]["attention"]["cudnn@joint"] == "skipped: no CUDA"
    assert res["rates"]["gemm"]["qkv@joint"]["tflops"] > 0
    floor = res["rates"]["floor"]
    assert floor["ms_per_forward"] == floor["skeleton"]["ms_per_forward"] > 0 and floor["sum_of_isolated_ms"] > 0
    assert run["profile"]["vs_floor"]["above_floor_ms"] == run["forward_ms"] - floor["ms_per_forward"]


def _bench_memory():
    import importlib.util

    if str(ROOT / "benchmarks") not in sys.path:  # its helpers import benchmarks/common.py, as when run as a script
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "benchmarks" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_memory_times_real_cli_runs_and_takes_their_medians(tiny_folder, tmp_path):
    """cli_rows over real `zimage -v generate` processes (the tiny model, small, on the CPU): every run timed to
    its PNG, import torch read from its timeline, medians over the runs."""
    bench = _bench_memory()
    flags = ("--device", "cpu", "--width", "256", "--height", "256", "--steps", "2")
    rows = bench.cli_rows(str(tiny_folder), str(tmp_path), {"cpu": flags}, 2)
    row = rows["cpu"]
    assert "error" not in row, row
    assert len(row["saved_runs_s"]) == 2 and all(0 < s < 120 for s in row["saved_runs_s"])
    assert row["saved_s"] == statistics.median(row["saved_runs_s"])
    assert len(row["import_torch_runs_s"]) == 2 and 0 < row["without_import_s"] < row["saved_s"]
    assert any("saved " in line for line in row["timeline"]) and row["stderr_tail"]
    assert not list(tmp_path.glob("*.png"))  # each run's PNG removed after timing


def test_bench_memory_child_failure_is_a_record_not_a_crash(tmp_path):
    """spawn: a child mode that fails (no model there) comes back as {'error': ...} with its wall time."""
    from types import SimpleNamespace

    bench = _bench_memory()
    args = SimpleNamespace(out=str(tmp_path), model=str(tmp_path / "no-model"))
    record = bench.spawn(args, "diffusers", "model_cpu_offload", timeout=120, extra_env={"CUDA_VISIBLE_DEVICES": ""})
    assert record["error"].startswith("exit ") and record["wall_s"] > 0
    assert not list(tmp_path.glob(".child-*"))


@pytest.mark.slow
@pytest.mark.parametrize("script, extra", [
    ("bench_lora.py", ["--ranks", "2,4", "--speed", "eager", "--no-diffusers"]),
    ("bench_image.py", ["--budgets", "", "--no-diffusers"]),
])
def test_lora_and_image_benchmarks_run_on_cpu(tiny_folder, tmp_path, script, extra):
    """The whole of each script on the tiny model (CPU, 256x256, one repeat): every path it times runs and the JSON
    is written (the GPU figures come from the device runs in BENCHMARKS.md)."""
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, script, "--model", str(tiny_folder), "--device", "cpu", "--size", "256x256",
                          "--repeats", "1", "--out", str(tmp_path), *extra] + (
                             ["--loras", str(tmp_path / "loras")] if script == "bench_lora.py" else []),
                         cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("*.json")
    import json

    res = json.loads(path.read_text())
    if script == "bench_lora.py":
        assert res["runtime"]["new_graphs_after_switch"] == 0 and res["merged"]["4"]["s_per_image"] > 0
        assert res["runtime_bucket_2"]["r2_s"] > 0
    else:
        assert res["zimage"]["img2img"]["s_per_image"] > 0 and "encode_image" in res["zimage"]["img2img"]["phases"]
