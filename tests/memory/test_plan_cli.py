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
