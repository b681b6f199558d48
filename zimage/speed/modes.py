"""The speed modes and which one runs (torch-free: the CLI lists the choices without importing torch)."""

from __future__ import annotations

from zimage.errors import UsageError

SPEED_CHOICES = ("auto", "eager", "compile")
# Images after which compiling pays for itself in one process; from BENCHMARKS.md (compile cost with a warm
# on-disk cache divided by the per-image saving). Refreshed when the benchmark is.
# H200 (BENCHMARKS.md): a compiling process reaches its first image ~13.5 s later than an eager one even with the
# on-disk cache (20.1 s against 6.9 s, bench_compile), then saves 0.20 s per image (0.934 s against eager's 1.134 s
# with the fused RMSNorm): ~65 images.
COMPILE_BREAK_EVEN_IMAGES = 65


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
