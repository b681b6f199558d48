"""A memory policy decides where each network lives, and moves them between phases (encode -> denoise -> decode).

The engine calls `place(parts)` once after loading and `enter(phase)` before each phase; nothing else in the
engine knows about offloading. `ResidentPolicy` keeps everything on the device (the fastest plan when it fits).
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("encode", "denoise", "decode")


@dataclass
class Parts:
    """The networks of a loaded engine."""

    transformer: object
    text_encoder: object
    vae: object
    device: object  # torch.device where compute runs


class MemoryPolicy:
    name = "base"

    def home(self, network: str, device):
        """Where `network` ('transformer' | 'text_encoder' | 'vae') is loaded: the device, or 'cpu' to stream from."""
        return device

    def place(self, parts: Parts) -> None:
        self.parts = parts

    def enter(self, phase: str) -> None:  # noqa: D401 - hook
        """Called before `phase`; move weights as this plan needs."""

    def describe(self) -> str:
        return self.name


class ResidentPolicy(MemoryPolicy):
    """Everything on the device, always."""

    name = "resident"
