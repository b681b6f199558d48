"""The speed modes and which one runs (torch-free: the CLI lists the choices without importing torch)."""

from __future__ import annotations

from zimage.errors import UsageError

SPEED_CHOICES = ("auto", "eager", "compile")
# Images after which compiling pays for itself in one process; from BENCHMARKS.md (compile cost with a warm
# on-disk cache divided by the per-image saving). Refreshed when the benchmark is.
# H200, 2026-12-03 (benchmarks/bench_compile.py, one fresh process each, 8 forwards at 1024x1024, with the
# precompiled functions of zimage.speed.precompiled): a compiling process reaches its first image 7.9 s later than an
# eager one with the caches warm (15.5 s against 7.6 s; 6.5 s of it importing dynamo and inductor), then saves
# 0.16 s per image (0.796 s against 0.957 s): 1 + 7.9 / 0.16 = 50 images. (With nothing cached, 44.8 s to the first
# image: 226 images.)
COMPILE_BREAK_EVEN_IMAGES = 50


def resolve_speed(mode: str, device, expected_images: int | None) -> str:
    """The concrete mode ('eager' | 'compile') for `mode` on `device`; expected_images None means 'many'."""
    if mode not in SPEED_CHOICES:
        raise UsageError(f"unknown speed mode {mode!r}; choose one of {', '.join(SPEED_CHOICES)}", param="speed")
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "eager"  # inductor's CPU code is not worth its compile time for a 6B model on a CPU
    if expected_images is not None and expected_images < COMPILE_BREAK_EVEN_IMAGES:
        return "eager"
    return "compile"
