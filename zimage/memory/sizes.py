"""Byte counts a memory plan is made of, taken from the checked model folder (headers only: no weights read).

Sizes are in the *compute* dtype (what sits in GPU memory), not the stored one: the published transformer is
fp32 on disk (24.6 GB) but 12.3 GB in bf16. Streamable units are the transformer's 30 main blocks (`layers.N.`)
and the text encoder's decoder layers (`layers.N.`); everything else of a network moves as one piece.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from zimage.models.tensor_names import FP8_KEEP

_BLOCK = re.compile(r"^layers\.(\d+)\.")


@dataclass(frozen=True)
class NetworkSizes:
    """Bytes of one network in the compute dtype."""

    blocks: tuple[int, ...]  # bytes of each streamable block, in order (empty for the VAE)
    rest: int  # bytes of everything else (embedders, refiners, final layer, ...)
    blocks_fp8: tuple[int, ...] = ()  # the same blocks with fp8 (1 byte) storage of their matrices
    rest_fp8: int = 0

    @property
    def total(self) -> int:
        return self.rest + sum(self.blocks)

    @property
    def block(self) -> int:
        """The largest block: the size of one streaming buffer."""
        return max(self.blocks, default=0)


@dataclass(frozen=True)
class ModelSizes:
    transformer: NetworkSizes
    text_encoder: NetworkSizes  # `rest` includes the token embeddings (0.78 GB of the 7.7 GB)
    text_embeddings: int  # bytes of the text encoder's token embedding table (kept on the host when offloaded)
    vae: NetworkSizes
    dim: int  # transformer width (3840)
    ffn: int  # transformer feed-forward width (10240)
    text_hidden: int  # text encoder width (2560)
    text_ffn: int  # text encoder feed-forward width (9728)
    max_text_tokens: int = 512
    dtype_bytes: int = 2  # bytes per element of the compute dtype
    vae_encoder: NetworkSizes | None = None  # the VAE's encoder, once an image input made the engine load it


def network_sizes(shapes: dict, dtype_bytes: int) -> NetworkSizes:
    """Group tensors {module name: shape} into streamable blocks and the rest, at `dtype_bytes` per element."""
    blocks: dict[int, list[int]] = {}
    blocks8: dict[int, list[int]] = {}
    rest = rest8 = 0
    for target, shape in shapes.items():
        numel = math.prod(shape)
        nbytes = numel * dtype_bytes
        fp8 = numel if len(shape) >= 2 and not FP8_KEEP.search(target) else nbytes
        m = _BLOCK.match(target)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(nbytes)
            blocks8.setdefault(int(m.group(1)), []).append(fp8)
        else:
            rest += nbytes
            rest8 += fp8
    order = sorted(blocks)
    return NetworkSizes(tuple(sum(blocks[i]) for i in order), rest, tuple(sum(blocks8[i]) for i in order), rest8)


def sizes_from_shapes(shapes: dict[str, dict], configs: dict[str, dict], dtype_bytes: int = 2,
                      max_text_tokens: int = 512) -> ModelSizes:
    """ModelSizes from {network: {module name: shape}} and {network: config dict}."""
    dim = int(configs["transformer"].get("dim", 3840))
    text_cfg = configs["text_encoder"]
    emb = sum(math.prod(s) for t, s in shapes["text_encoder"].items() if t.startswith("embed_tokens."))
    vae = network_sizes(shapes["vae"], dtype_bytes)
    return ModelSizes(
        transformer=network_sizes(shapes["transformer"], dtype_bytes),
        text_encoder=network_sizes(shapes["text_encoder"], dtype_bytes),
        text_embeddings=emb * dtype_bytes,
        vae=NetworkSizes((), vae.total, (), vae.total),  # the VAE is never streamed nor stored in fp8
        dim=dim,
        ffn=int(dim / 3 * 8),  # zimage.models.z_image.TransformerBlock: FeedForward(dim, int(dim / 3 * 8))
        text_hidden=int(text_cfg.get("hidden_size", 2560)),
        text_ffn=int(text_cfg.get("intermediate_size", 9728)),
        max_text_tokens=max_text_tokens,
        dtype_bytes=dtype_bytes,
    )


def with_vae_encoder(sizes: ModelSizes, checked_encoder) -> ModelSizes:
    """`sizes` plus the VAE encoder (a CheckedNetwork of zimage.weights.networks.build_vae_encoder): every plan made
    from the result keeps the encoder resident and has an image-encoding phase."""
    from dataclasses import replace

    shapes = {t: info.shape for t, (_, info) in checked_encoder.tensors.items()}
    enc = network_sizes(shapes, sizes.dtype_bytes)
    return replace(sizes, vae_encoder=NetworkSizes((), enc.total, (), enc.total))


def with_extra_transformer_bytes(sizes: ModelSizes, per_block: dict[int, int], rest: int) -> ModelSizes:
    """`sizes` with bytes added to the transformer's blocks (block index -> bytes) and to the rest: tensors that are
    not in the checkpoint but live with those blocks (runtime LoRA slots), in the compute dtype under fp8 too."""
    from dataclasses import replace

    tr = sizes.transformer
    blocks = tuple(b + per_block.get(i, 0) for i, b in enumerate(tr.blocks))
    blocks8 = tuple(b + per_block.get(i, 0) for i, b in enumerate(tr.blocks_fp8))
    return replace(sizes, transformer=NetworkSizes(blocks, tr.rest + rest, blocks8, tr.rest_fp8 + rest))


def model_sizes(checked: dict, dtype_bytes: int = 2, max_text_tokens: int = 512) -> ModelSizes:
    """ModelSizes of a checked folder (`zimage.weights.check.check_model_folder`)."""
    shapes = {name: {t: info.shape for t, (_, info) in c.tensors.items()} for name, c in checked.items()}
    configs = {name: c.network.config for name, c in checked.items()}
    return sizes_from_shapes(shapes, configs, dtype_bytes, max_text_tokens)


def published_model_sizes(dtype_bytes: int = 2) -> ModelSizes:
    """Sizes of the published Z-Image-Turbo, from its shapes (built on the meta device: no memory, ~1 s)."""
    import torch

    from zimage.models.qwen3 import Qwen3TextEncoder
    from zimage.models.vae import VAEDecoder
    from zimage.models.z_image import ZImageTransformer
    from zimage.models.published import FULL_TEXT, FULL_TRANSFORMER, FULL_VAE

    with torch.device("meta"):
        tr = ZImageTransformer(FULL_TRANSFORMER)
        te = Qwen3TextEncoder(FULL_TEXT, FULL_TEXT["num_hidden_layers"] - 1)  # we never run the last layer
        vae = VAEDecoder(dict(latent_channels=16, up_block_types=("UpDecoderBlock2D",) * 4, **FULL_VAE))
    shapes = {
        "transformer": {k: tuple(v.shape) for k, v in tr.state_dict().items()},
        "text_encoder": {k: tuple(v.shape) for k, v in te.state_dict().items()},
        "vae": {k: tuple(v.shape) for k, v in vae.state_dict().items()},
    }
    configs = {"transformer": FULL_TRANSFORMER, "text_encoder": FULL_TEXT, "vae": {}}
    return sizes_from_shapes(shapes, configs, dtype_bytes)
