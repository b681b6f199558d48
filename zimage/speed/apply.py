"""Applying a speed mode to an engine."""

from __future__ import annotations

from zimage.engine.config import SPEED_CHOICES
from zimage.errors import UsageError


def apply_speed(engine, mode: str) -> str:
    if mode not in SPEED_CHOICES:
        raise UsageError(f"unknown speed mode {mode!r}; choose one of {', '.join(SPEED_CHOICES)}", param="speed")
    return "eager"
