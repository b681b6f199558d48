"""The three networks, built on the meta device from a folder's configs (no memory, no init), plus the rules that
map a checkpoint's tensor names to them.

The classes are zimage.models' torch-only twins of diffusers' and transformers' (same tensor names, outputs equal
to fp32 rounding, tested against them): importing those libraries costs more than reading the weights.
- transformer: `ZImageTransformer` (diffusers' `ZImageTransformer2DModel`), all tensors used.
- text encoder: `Qwen3TextEncoder` (transformers' `Qwen3Model`) cut after layer L-2: the pipeline reads
  `hidden_states[-2]`, the input of the last layer, so the last layer and the final norm are never computed (and
  their ~1/36 of the bytes never read).
- VAE: `VAEDecoder` (diffusers' `AutoencoderKL`, decoder only): text-to-image never encodes an image.
- VAE encoder: `VAEEncoder` (the `encoder.*` / `quant_conv.*` tensors of the same vae/ folder), only for image
  inputs (img2img, inpainting). It is in OPTIONAL_BUILDERS, not BUILDERS: checking and loading a folder for
  text-to-image never reads it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from zimage.errors import ModelFolderError
from zimage.weights.layout import TEXT_ENCODER, TRANSFORMER, VAE, WeightComponent


@dataclass
class MetaNetwork:
    """A network on the meta device and how checkpoint names map onto it."""

    component: WeightComponent
    module: object  # torch.nn.Module on the meta device
    rename: Callable[[str], str | None]  # checkpoint name -> module name, or None for a tensor we skip on purpose
    config: dict = field(default_factory=dict)


def _read_config(folder: Path, component: WeightComponent) -> dict:
    path = folder / component.name / component.config_file
    if not path.is_file():
        raise ModelFolderError(f"{folder} is missing {component.name}/{component.config_file} (the {component.name})")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None


def _construct(folder: Path, component: WeightComponent, build: Callable[[], object]):
    """Build a network on the meta device; a config its class rejects is a damaged folder, reported by name."""
    import torch

    try:
        with torch.device("meta"):
            return build()
    except (AssertionError, ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        path = folder / component.name / component.config_file
        raise ModelFolderError(
            f"{path} does not describe a valid {component.name}: {type(e).__name__} {e}".rstrip()
        ) from None


def build_transformer(folder: Path) -> MetaNetwork:
    from zimage.models.z_image import ZImageTransformer

    config = _read_config(folder, TRANSFORMER)
    module = _construct(folder, TRANSFORMER, lambda: ZImageTransformer(config))
    return MetaNetwork(TRANSFORMER, module, lambda name: name, config)


def build_text_encoder(folder: Path) -> MetaNetwork:
    from zimage.models.qwen3 import Qwen3TextEncoder

    config = _read_config(folder, TEXT_ENCODER)
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers < 2:
        raise ModelFolderError(f"{folder / TEXT_ENCODER.name / TEXT_ENCODER.config_file} has num_hidden_layers="
                               f"{num_layers!r}; at least 2 are needed")
    # hidden_states[-2] == the output of layer L-2: keep layers 0..L-2, no final norm
    module = _construct(folder, TEXT_ENCODER, lambda: Qwen3TextEncoder(config, num_layers - 1))
    skipped_layer = re.compile(rf"^layers\.{num_layers - 1}\.")

    def rename(name: str) -> str | None:
        if name.startswith("model."):  # checkpoints saved from Qwen3ForCausalLM
            name = name[len("model."):]
        if name == "lm_head.weight" or name == "norm.weight" or skipped_layer.match(name):
            return None
        return name

    return MetaNetwork(TEXT_ENCODER, module, rename, config)


def build_vae_decoder(folder: Path) -> MetaNetwork:
    from zimage.models.vae import VAEDecoder

    config = _read_config(folder, VAE)
    module = _construct(folder, VAE, lambda: VAEDecoder(config))

    def rename(name: str) -> str | None:
        return None if name.startswith(("encoder.", "quant_conv.")) else name

    return MetaNetwork(VAE, module, rename, config)


def build_vae_encoder(folder: Path) -> MetaNetwork:
    from zimage.models.vae import VAEEncoder

    config = _read_config(folder, VAE)
    module = _construct(folder, VAE, lambda: VAEEncoder(config))

    def rename(name: str) -> str | None:
        return name if name.startswith(("encoder.", "quant_conv.")) else None

    return MetaNetwork(VAE, module, rename, config)


# What text-to-image checks and loads (zimage.weights.check.check_model_folder iterates this).
BUILDERS = {"transformer": build_transformer, "text_encoder": build_text_encoder, "vae": build_vae_decoder}
# Networks built only when a request needs them; check_network(folder, name) accepts these names too.
OPTIONAL_BUILDERS = {"vae_encoder": build_vae_encoder}
