"""A memory plan: where each part of the model lives, and what that is predicted to cost in GPU bytes and bus bytes.

Plans are data (made by `zimage.memory.planner.choose_plan`); `zimage.memory.planned.PlannedPolicy` applies one.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    transformer_blocks: int  # streamable transformer blocks in the model (30 published)
    transformer_streamed: int  # of those, how many live in pinned host memory and are streamed in every forward
    text_layers: int  # text encoder layers in the model (35: the last of 36 is never computed)
    text_resident_layers: int  # of those, how many stay on the GPU (the rest are streamed in per new prompt)
    text_offloaded: bool  # False: the whole text encoder on the GPU; True: its embedding table on the host
    weight_dtype: str  # "bf16" (the compute dtype, lossless) or "fp8" (transformer matrices stored in fp8: lossy)
    tiled_decode: bool  # VAE decode in 512-pixel tiles (bounded activation memory)
    peak_bytes: int  # predicted peak of allocated GPU bytes (max over the phases below)
    phase_peaks: tuple[tuple[str, int], ...]  # (("encode", bytes), ("denoise", bytes), ("decode", bytes))
    moved_per_image: int  # bytes copied host -> GPU per image for the transformer (streamed blocks x steps)
    moved_per_new_prompt: int  # bytes copied host -> GPU to encode a prompt that is not cached
    budget_bytes: int  # the budget the plan was chosen for
    width: int = 1024  # the image size and batch (rows through the transformer) it was chosen for
    height: int = 1024
    batch: int = 1
    image_encoder: bool = False  # the VAE encoder is loaded (an image input was used) and counted

    @property
    def kind(self) -> str:
        """'resident' | 'text-offload' | 'stream', plus '+tiled' and '+fp8'."""
        if self.transformer_streamed:
            base = "stream"
        elif self.text_offloaded:
            base = "text-offload"
        else:
            base = "resident"
        return base + ("+tiled" if self.tiled_decode else "") + ("+fp8" if self.weight_dtype == "fp8" else "")

    def streamed_blocks(self) -> list[int]:
        """Indices of the streamed transformer blocks: spread evenly, so that each copy overlaps the compute of
        the resident blocks before it (a run of streamed blocks would wait on the bus back to back)."""
        return spread(self.transformer_streamed, self.transformer_blocks)

    def streamed_text_layers(self) -> list[int]:
        return spread(self.text_layers - self.text_resident_layers, self.text_layers)

    def describe(self) -> str:
        parts = [self.kind]
        if self.transformer_streamed:
            parts.append(f"transformer {self.transformer_blocks - self.transformer_streamed}/{self.transformer_blocks}"
                         f" blocks resident, {self.transformer_streamed} streamed")
        if self.text_offloaded:
            parts.append(f"text encoder {self.text_resident_layers}/{self.text_layers} layers resident")
        if self.image_encoder:
            parts.append("VAE encoder resident")
        parts.append(f"predicted peak {self.peak_bytes / GIB:.1f} GiB of {self.budget_bytes / GIB:.1f} GiB "
                     f"at {self.width}x{self.height}")
        if self.moved_per_image or self.moved_per_new_prompt:
            parts.append(f"moves {self.moved_per_image / GIB:.1f} GiB/image + "
                         f"{self.moved_per_new_prompt / GIB:.1f} GiB/new prompt")
        return ", ".join(parts)

    def leaner_than(self, other: "MemoryPlan") -> bool:
        return self.peak_bytes < other.peak_bytes


def spread(n: int, total: int) -> list[int]:
    """n indices out of range(total), evenly spaced, ending at the last one: spread(3, 9) == [2, 5, 8]."""
    if not 0 <= n <= total:
        raise ValueError(f"cannot pick {n} of {total} blocks")
    return [total - 1 - (i * total) // n for i in range(n)][::-1]
