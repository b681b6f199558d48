"""What a generation returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from zimage.io.metadata import ImageMetadata
from zimage.request import GenerateRequest


@dataclass
class GeneratedImage:
    image: object  # PIL.Image.Image, RGB
    metadata: ImageMetadata  # everything needed to make it again
    index: int  # position in the request (prompt-major)


@dataclass
class GenerateResult:
    request: GenerateRequest
    images: list[GeneratedImage]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: encode, denoise, decode, total
    warnings: list[str] = field(default_factory=list)  # e.g. prompt truncation


@dataclass(frozen=True)
class Progress:
    """A step boundary. phase: 'encode' | 'denoise' | 'decode'; step counts from 1 to total."""

    phase: str
    step: int
    total: int
    latents: object = None  # (B, 16, h, w) during 'denoise', for previews; do not modify
