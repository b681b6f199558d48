"""A LoRA as a request names it: a file (CLI, Python) or a name in the server's LoRA folder, with a strength."""

from __future__ import annotations

import math
from dataclasses import dataclass

from zimage.errors import UsageError

MAX_LORAS = 8  # per request (and per merged set): more is almost always a mistake, and each costs rank
MAX_SCALE = 10.0  # |strength|; trainers' previews use 0.5-1.5, negative values subtract a style


@dataclass(frozen=True)
class LoraSpec:
    name: str  # a path to a .safetensors file or PEFT folder, or a name in the LoRA folder (`serve --lora-dir`)
    scale: float = 1.0  # the user's strength: the update is scale * (the file's own alpha/rank scaling) * up @ down

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise UsageError(f"a LoRA needs a file or a name, got {self.name!r}", param="lora")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            raise UsageError(f"LoRA {self.name!r}: the strength must be a number, got {self.scale!r}", param="lora")
        if abs(self.scale) > MAX_SCALE:
            raise UsageError(f"LoRA {self.name!r}: the strength must be between -{MAX_SCALE:g} and {MAX_SCALE:g}, "
                             f"got {self.scale:g}", param="lora")
        object.__setattr__(self, "scale", float(self.scale))

    def __str__(self) -> str:
        return f"{self.name}:{self.scale:g}"


def parse_lora(text: str) -> LoraSpec:
    """'PATH_OR_NAME[:SCALE]' (the CLI's --lora): the part after the last ':' is the strength when it is a number
    (so 'style.safetensors:0.8' and 'C:/loras/x.safetensors' both read as meant)."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:  # no strength given: the ':' is part of the name (a Windows drive, say)
            return LoraSpec(text)
        return LoraSpec(head, scale)  # a strength out of range is an error, not a file name
    return LoraSpec(text)


def check_loras(loras) -> tuple[LoraSpec, ...]:
    """A tuple of LoraSpec from LoraSpecs, 'NAME[:SCALE]' strings or (name, scale) pairs; each name at most once."""
    if loras is None:
        return ()
    if isinstance(loras, (str, LoraSpec)):
        loras = (loras,)
    out = []
    for item in loras:
        if isinstance(item, LoraSpec):
            out.append(item)
        elif isinstance(item, str):
            out.append(parse_lora(item))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(LoraSpec(item[0], item[1]))
        else:
            raise UsageError(f"a LoRA is 'NAME[:SCALE]' or (name, scale), got {item!r}", param="lora")
    if len(out) > MAX_LORAS:
        raise UsageError(f"at most {MAX_LORAS} LoRAs at once, got {len(out)}", param="lora")
    names = [s.name for s in out]
    for n in names:
        if names.count(n) > 1:
            raise UsageError(f"LoRA {n!r} is given twice; give it once with the strength you want", param="lora")
    return tuple(out)
