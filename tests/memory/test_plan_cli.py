"""`zimage plan`: prints the plan and predicted peak for a budget and size, without a GPU."""

from __future__ import annotations

import pytest
import torch

from zimage.cli.main import main


def test_plan_for_a_folder(tiny_folder, capsys):
    assert main(["plan", "--model", str(tiny_folder), "--vram-budget", "2", "--width", "512", "--height", "768"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: resident" in out and "predicted peak" in out and "512x768" in out
    assert "encode" in out and "denoise" in out and "decode" in out


def test_plan_published_shapes(capsys):
    assert main(["plan", "--model", "published", "--vram-budget", "12"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: stream" in out and "of 12.0 GiB" in out


def test_plan_published_shapes_fp8_keeps_the_transformer_resident_at_12_gib(capsys):
    assert main(["plan", "--model", "published", "--vram-budget", "12", "--fp8"]) == 0
    out = capsys.readouterr().out
    assert "+fp8" in out and "memory plan: stream" not in out


def test_plan_too_small_is_a_usage_error(tiny_folder, capsys):
    assert main(["plan", "--model", str(tiny_folder), "--vram-budget", "0.2"]) == 2
    assert "too small" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the budget is what it has free")
def test_plan_without_gpu_needs_a_budget(tiny_folder, capsys):
    assert main(["plan", "--model", str(tiny_folder)]) == 2
    assert "--vram-budget" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_on_a_gpu_takes_its_free_memory_as_the_budget(tiny_folder, capsys):
    from zimage.memory.select import FREE_MARGIN_BYTES

    assert main(["plan", "--model", str(tiny_folder)]) == 0
    budget_gib = (torch.cuda.mem_get_info()[0] - FREE_MARGIN_BYTES) / 2**30  # the GPU is idle: free stays put
    out = capsys.readouterr().out
    assert "memory plan: resident" in out and f"of {budget_gib:.1f} GiB" in out, out


@pytest.fixture
def no_weights_here(monkeypatch, tmp_path):
    """No model in any cache this machine has (the README's first `zimage plan` on a fresh machine)."""
    for var in ("HF_HOME", "HF_HUB_CACHE", "MODELSCOPE_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("ZIMAGE_MODEL", raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a hypothetical GPU only on a machine without one")
def test_readme_plan_command_works_without_weights_and_says_so(no_weights_here, capsys):
    assert main(["plan", "--vram-budget", "8"]) == 0
    out = capsys.readouterr().out
    assert "published Z-Image-Turbo shapes" in out and "is not on this machine" in out
    assert "(bf16 on cuda)" in out and "of 8.0 GiB" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a hypothetical GPU only on a machine without one")
def test_plan_honours_dtype_and_device(no_weights_here, capsys):
    def plan(*flags):
        assert main(["plan", "--model", "published", "--vram-budget", "24", *flags]) == 0
        return capsys.readouterr().out

    bf16, fp32, cpu = plan(), plan("--dtype", "fp32"), plan("--device", "cpu")
    assert "(bf16 on cuda)" in bf16 and "transformer 11.46 GiB" in bf16
    assert "(fp32 on cuda)" in fp32 and "transformer 22.93 GiB" in fp32  # 4 bytes a weight, not bf16's 2
    assert "(fp32 on cpu)" in cpu and "everything stays resident" in cpu and "memory plan: resident" in cpu


def test_plan_shows_the_plan_the_engine_takes(tiny_folder, capsys):
    """One planning path: `zimage plan` for the tiny folder at a budget and the engine loaded with that budget
    choose the same plan (CPU: resident whatever the budget, the CPU rule)."""
    from zimage import Engine

    assert main(["plan", "--model", str(tiny_folder), "--device", "cpu", "--vram-budget", "0.5"]) == 0
    out = capsys.readouterr().out
    engine = Engine.load(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager", vram_budget_gib=0.5)
    assert f"memory plan: {engine.policy.plan.describe()}" in out
