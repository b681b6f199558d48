"""The normalised form of a LoRA file: what every on-disk layout is read into, and the error a bad file raises.

A factor is one low-rank update of one linear layer: W (out, in) becomes W + s * scale * up @ down, where s is the
user's strength (applied by the engine, not here) and `scale` is what the file's own alpha/rank convention asks for.
Tensors are fp32 on the CPU whatever the file stored, so that every layout of the same LoRA gives the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from zimage.errors import UsageError

TRANSFORMER = "transformer"  # network names, the keys of LoraFile.networks
TEXT_ENCODER = "text_encoder"
NETWORKS = (TRANSFORMER, TEXT_ENCODER)


class LoraError(UsageError):
    """A LoRA file that cannot be used as it is: the message names the file, the first offending key (when there
    is one) and what was expected. Exit code 2, like every bad input."""

    def __init__(self, path: Path | str, message: str, key: str | None = None):
        where = f"{path}: " if key is None else f"{path}: key {key!r}: "
        super().__init__(where + message, param="lora")
        self.path = Path(path)
        self.key = key


@dataclass(frozen=True, eq=False)
class LoraFactor:
    """One module's update: delta = scale * up @ down, (out, in). eq=False: tensors do not compare as a bool."""

    down: torch.Tensor  # (rank, in) fp32, contiguous
    up: torch.Tensor  # (out, rank) fp32, contiguous
    scale: float  # alpha / rank, alpha / sqrt(rank) for rsLoRA, or 1.0 where the file gives no alpha
    key: str  # the file's key of the down weight this factor came from (named in errors)
    alpha: float | None = None  # the alpha the file (or its PEFT config) gives; None where it gives none
    source: str = ""  # how the key was mapped, e.g. "fused attention.qkv rows 0:3840" (empty for a plain 1:1 key)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    def delta(self) -> torch.Tensor:
        """scale * up @ down: (out, in) fp32."""
        return (self.up @ self.down) * self.scale


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA file read and normalised. `networks` maps "transformer" / "text_encoder" to {module name: factor},
    module names as zimage.models names them (diffusers' / transformers' names); only networks the file carries
    are present. Treat the dicts as read-only."""

    name: str  # what users call it: the file name without .safetensors (the folder name for a PEFT folder)
    path: Path  # the file or PEFT folder given
    format: str  # the layout detected: "peft", "diffusers", "ai-toolkit", "kohya", "lycoris", "diffsynth", ...
    sha256: str  # hex SHA-256 of the whole weights file (adapter_model.safetensors for a PEFT folder)
    addnet_hash: str  # hex SHA-256 of the file's bytes after the safetensors header (kohya / sd-webui "addnet" hash)
    short_hash: str  # the 12 hex digits AUTOMATIC1111 writes in "Lora hashes" (see zimage.weights.lora.files)
    networks: dict[str, dict[str, LoraFactor]]
    metadata: dict[str, str] = field(default_factory=dict)  # the safetensors header's __metadata__
    peft_config: dict | None = None  # adapter_config.json, or the header's lora_adapter_metadata, when present
    notes: tuple[str, ...] = ()  # what the reader decided that a user may want to know (duplicates skipped)

    @property
    def transformer(self) -> dict[str, LoraFactor]:
        return self.networks.get(TRANSFORMER, {})

    @property
    def text_encoder(self) -> dict[str, LoraFactor]:
        return self.networks.get(TEXT_ENCODER, {})
