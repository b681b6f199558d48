"""`zimage plan`: prints the plan and predicted peak for a budget and size, without a GPU."""

from __future__ import annotations

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


def test_plan_without_gpu_needs_a_budget(tiny_folder, capsys):
    assert main(["plan", "--model", str(tiny_folder)]) == 2
    assert "--vram-budget" in capsys.readouterr().err
