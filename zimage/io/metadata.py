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

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ImageMetadata":
        data = json.loads(text)
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
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
        fields.append(f"Version: zimage {self.zimage_version}")
        lines.append(", ".join(fields))
        return "\n".join(lines)
