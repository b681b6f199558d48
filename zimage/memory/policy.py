"""What a memory policy works on: the networks of an engine and the device where they compute.

The engine calls `policy.place(parts)` once per placement and `policy.enter(phase)` before each phase
(encode -> denoise -> decode); nothing else in the engine knows about offloading. zimage.memory.planned.PlannedPolicy
is the policy: it applies a MemoryPlan.
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("encode", "encode_image", "denoise", "decode")  # encode_image: img2img and inpainting only


@dataclass
class Parts:
    """The networks of a loaded engine."""

    transformer: object
    text_encoder: object
    vae: object
    device: object  # torch.device where compute runs
    vae_encoder: object = None  # loaded on the first image input (img2img, inpainting); always on the device


def on_device(module, device) -> bool:
    """Every parameter of `module` on `device` (a torch.device; an unindexed one means index 0, where torch puts it)."""
    return all(p.device.type == device.type and (p.device.index or 0) == (device.index or 0)
               for p in module.parameters())
