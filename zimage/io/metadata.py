"""What an image remembers: every setting needed to make it again.

Two forms in each PNG: `parameters`, the text AUTOMATIC1111 writes (read by most image tools and galleries), and
`zimage`, a JSON object with every field. `--from-png` reads the JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from zimage.version import __version__

SAMPLER_NAME = "Euler (flow matching)"


@dataclass(frozen=True)
class ImageMetadata:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    model: str  # repo id or folder name
    model_revision: str | None
    dtype: str
    sampler: str = SAMPLER_NAME
    zimage_version: str = __version__
    # LoRAs applied (merged and per request), in order: {"name", "file", "scale", "sha256", "short_hash"}; "file" is
    # the name or path as it was given, so --from-png can apply it again (and check the sha256)
    loras: tuple = ()
    # Starting from a picture: {"sha256", "width", "height", "source_width", "source_height"} of the input image as
    # the model saw it (after resizing), the mask's {"sha256", "blur"}, the strength and the resize mode
    image: dict | None = None
    mask: dict | None = None
    strength: float | None = None
    resize: str | None = None
    recipe: str | None = None  # the model's recipe the defaults came from: "turbo" | "base" (zimage.recipe)

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ImageMetadata":
        data = json.loads(text)
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        if "loras" in known:
            known["loras"] = tuple(known["loras"])
        return cls(**known)

    def a1111_parameters(self) -> str:
        """AUTOMATIC1111's format: prompt, 'Negative prompt: ...', then 'Key: value, ...'."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"CFG scale: {self.guidance:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model: {self.model.rsplit('/', 1)[-1]}",
        ]
        if self.model_revision:
            fields.append(f"Model hash: {self.model_revision[:10]}")
        if self.strength is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.mask is not None and self.mask.get("blur"):
            fields.append(f"Mask blur: {self.mask['blur']}")
        if self.loras:  # as AUTOMATIC1111 writes it: the names and their short hashes, quoted as one value
            fields.append('Lora hashes: "' + ", ".join(f"{lo['name']}: {lo['short_hash']}" for lo in self.loras) + '"')
        fields.append(f"Version: zimage {self.zimage_version}")
        lines.append(", ".join(fields))
        return "\n".join(lines)
