"""The speed modes and which one runs (torch-free: the CLI lists the choices without importing torch)."""

from __future__ import annotations

from zimage.errors import UsageError

SPEED_CHOICES = ("auto", "eager", "compile")
# Images after which compiling pays for itself in one process; from BENCHMARKS.md (compile cost with a warm
# on-disk cache divided by the per-image saving). Refreshed when the benchmark is.
# H200, 2026-12-03 (benchmarks/bench_compile.py, medians of 2 fresh processes each, 8 forwards at 1024x1024): a
# compiling process reaches its first image 12.1 s later than an eager one with the caches warm (19.3 s against
# 7.2 s), then saves 0.20 s per image (0.785 s against 0.986 s): 1 + 12.1 / 0.20 = 61 images. (With nothing
# cached, 42.1 s to the first image: 175 images.)
COMPILE_BREAK_EVEN_IMAGES = 61


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
