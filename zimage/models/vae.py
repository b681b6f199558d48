"""diffusers' `AutoencoderKL` (the Flux VAE of Z-Image) in plain torch: the decoder, and the encoder for image inputs.

Importing diffusers costs seconds (package probes, torch._dynamo, peft, every model class); zimage re-implements
exactly the two halves it runs with the same parameter names (`decoder.*` + `post_quant_conv.*`, and `encoder.*` +
`quant_conv.*` of diffusers' state dict) and the same op order, so outputs match diffusers to fp32 rounding:

    vae = VAEDecoder(json.load(open("vae/config.json")))  # under torch.device("meta") to skip the init
    vae.load_state_dict(decoder_state_dict, strict=True, assign=True)
    image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor)  # (B, 3, 8h, 8w) in ~[-1, 1]

    enc = VAEEncoder(config)  # text-to-image never builds it: only image inputs (img2img, inpainting) need it
    enc.load_state_dict(encoder_state_dict, strict=True, assign=True)
    mean, std = gaussian_mean_std(enc.encode(pixels))  # pixels (B, 3, H, W) in [-1, 1] -> (B, latent, H/8, W/8)

Sources reproduced (diffusers 0.42): autoencoders/autoencoder_kl.py (encode, decode, tiled_encode, tiled_decode,
blend_v/h), autoencoders/vae.py (Encoder, Decoder, DiagonalGaussianDistribution), unets/unet_2d_blocks.py
(UNetMidBlock2D, DownEncoderBlock2D, UpDecoderBlock2D), resnet.py (ResnetBlock2D), downsampling.py (Downsample2D),
upsampling.py (Upsample2D), attention_processor.py (Attention + AttnProcessor2_0).
No buffers: every tensor is a parameter, so meta construction + `assign=True` loading leaves nothing uninitialised.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

# diffusers' AutoencoderKL defaults for the keys the two halves read (a config.json may omit any of them).
_DEFAULTS = dict(
    in_channels=3, latent_channels=4, out_channels=3, block_out_channels=(64,), layers_per_block=1,
    norm_num_groups=32, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    act_fn="silu", mid_block_add_attention=True, use_quant_conv=True, use_post_quant_conv=True,
    scaling_factor=0.18215, shift_factor=None, sample_size=32,
)
_EPS = 1e-6  # every GroupNorm of diffusers' Encoder and Decoder (resnets, mid attention, conv_norm_out)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D without time embedding: x -> shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # A 1x1 projection only where the channel count changes (diffusers' use_in_shortcut).
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout p=0 in diffusers' VAE: nothing to do
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # diffusers then divides by output_scale_factor = 1: a no-op, skipped


class SpatialSelfAttention(nn.Module):
    """The mid block's Attention: GroupNorm, one head of dim C over the H*W positions, output proj, + residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # to_out.1 is a parameterless Dropout(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> same
        b, c, height, width = x.shape
        # Same layout dance as AttnProcessor2_0 (so the GroupNorm sees the same (B, C, HW) tensor).
        h = x.view(b, c, height * width).transpose(1, 2)  # (B, HW, C)
        h = self.group_norm(h.transpose(1, 2)).transpose(1, 2)
        # heads = C // attention_head_dim = 1: (B, 1, HW, C); SDPA's default scale 1/sqrt(C) = diffusers' scale.
        q = self.to_q(h).view(b, -1, 1, c).transpose(1, 2)
        k = self.to_k(h).view(b, -1, 1, c).transpose(1, 2)
        v = self.to_v(h).view(b, -1, 1, c).transpose(1, 2)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        h = h.transpose(1, 2).reshape(b, -1, c).to(q.dtype)  # (B, HW, C)
        h = self.to_out[0](h)
        h = h.transpose(-1, -2).reshape(b, c, height, width)
        return h + x  # residual_connection=True; rescale_output_factor = 1: the division is a no-op, skipped


class MidBlock(nn.Module):
    """UNetMidBlock2D with one layer: resnet, [attention], resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        # Without attention diffusers stores None in the list, i.e. no `attentions.0.*` keys: an empty list here.
        # (attentions first, as diffusers registers them: same state-dict order.)
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Upsample2D(nn.Module):
    """Nearest x2, then a 3x3 conv (diffusers Upsample2D with use_conv=True, name="conv")."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, 2H, 2W)
        # diffusers makes the input contiguous first for batches >= 64 or > 2**31 output elements (NHWC kernel bugs).
        if x.shape[0] >= 64 or x.numel() * 2 > 2**31:
            x = x.contiguous()
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpDecoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    """diffusers vae.Decoder (norm_type "group"): conv_in, mid block, up blocks (widest first), norm, silu, conv_out."""

    def __init__(self, cfg: SimpleNamespace):
        super().__init__()
        channels = list(cfg.block_out_channels)
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, channels[-1], 3, padding=1)
        self.up_blocks = nn.ModuleList()  # registered before mid_block, as diffusers does: same state-dict order
        self.mid_block = MidBlock(channels[-1], groups, cfg.mid_block_add_attention)
        reversed_channels = channels[::-1]
        out_ch = reversed_channels[0]
        for i in range(len(cfg.up_block_types)):
            in_ch, out_ch = out_ch, reversed_channels[i]
            self.up_blocks.append(UpDecoderBlock2D(
                in_ch, out_ch, cfg.layers_per_block + 1, groups, add_upsample=i != len(channels) - 1
            ))
        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, latent, h, w) -> (B, out, h * 2**(n-1), ...)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Downsample2D(nn.Module):
    """Pad one zero row/column at the bottom/right, then a stride-2 3x3 conv without padding (diffusers Downsample2D
    with use_conv=True, padding=0, name="op": the conv is stored as `conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2) for even H, W
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class DownEncoderBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class Encoder(nn.Module):
    """diffusers vae.Encoder (double_z=True): conv_in, down blocks (narrowest first), mid block, norm, silu, conv_out
    to 2 * latent_channels (the mean and log-variance of the latent distribution)."""

    def __init__(self, cfg: SimpleNamespace):
        super().__init__()
        channels = list(cfg.block_out_channels)
        groups = cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out_ch = channels[0]
        for i in range(len(cfg.down_block_types)):
            in_ch, out_ch = out_ch, channels[i]
            # layers_per_block resnets here (the decoder's up blocks have one more)
            self.down_blocks.append(DownEncoderBlock2D(
                in_ch, out_ch, cfg.layers_per_block, groups, add_downsample=i != len(channels) - 1
            ))
        self.mid_block = MidBlock(channels[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) -> (B, 2*latent, H / 2**(n-1), ...)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _vae_config(config: dict, blocks_key: str, block_type: str, who: str) -> SimpleNamespace:
    """A diffusers vae/config.json dict -> SimpleNamespace with diffusers' defaults; refuses what `who` cannot build.

    `shift_factor` null becomes 0.0; `blocks_key` (up_block_types or down_block_types) must be all `block_type`."""
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    bad = [t for t in cfg[blocks_key] if t != block_type]
    if bad:
        kind = blocks_key.split("_")[0]
        raise ValueError(f"{who} supports only {block_type} {kind} blocks, got {bad[0]!r}")
    if cfg["act_fn"] != "silu":
        raise ValueError(f"{who} supports only act_fn 'silu', got {cfg['act_fn']!r}")
    if len(cfg[blocks_key]) != len(cfg["block_out_channels"]):
        raise ValueError(f"{blocks_key} and block_out_channels must have the same length")
    cfg["block_out_channels"] = tuple(cfg["block_out_channels"])
    cfg["up_block_types"] = tuple(cfg["up_block_types"])
    cfg["down_block_types"] = tuple(cfg["down_block_types"])
    cfg["shift_factor"] = float(cfg["shift_factor"] or 0.0)
    return SimpleNamespace(**cfg)


def _tile_sizes(cfg: SimpleNamespace) -> tuple[int, int, float]:
    """(tile_sample_min_size, tile_latent_min_size, tile_overlap_factor) as AutoencoderKL.__init__ sets them: tiles
    of sample_size pixels, i.e. sample_size / 2**(n-1) latents (n = number of blocks), a quarter overlapping."""
    sample_size = cfg.sample_size
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    return int(sample_size), int(sample_size / (2 ** (len(cfg.block_out_channels) - 1))), 0.25


class VAEDecoder(nn.Module):
    """AutoencoderKL's decode path. `config` is the dict of a diffusers vae/config.json (AutoencoderKL).

    Attributes: `config` (SimpleNamespace of the config; `shift_factor` is 0.0 when null), `decoder`,
    `post_quant_conv` (None when the config has use_post_quant_conv false, as the Flux VAE does), and the tiling
    knobs `tile_sample_min_size`, `tile_latent_min_size`, `tile_overlap_factor` (AutoencoderKL's defaults).
    Call decode/tiled_decode under torch.inference_mode(): nothing here turns autograd off.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = _vae_config(config, "up_block_types", "UpDecoderBlock2D", "VAEDecoder")
        self.decoder = Decoder(self.config)
        latent = self.config.latent_channels
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if self.config.use_post_quant_conv else None
        self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor = _tile_sizes(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def _decode_tile(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, h, w) unscaled latents in the module's dtype -> (B, out_channels, 8h, 8w) image.

        = diffusers `vae.decode(z, return_dict=False)[0]` (tiling off): the caller does the
        `z / scaling_factor + shift_factor` step, as the pipeline does.
        """
        return self._decode_tile(z)

    def tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        """= diffusers `vae.tiled_decode(z, return_dict=False)[0]`: overlapping latent tiles decoded one at a time
        (peak activation memory bounded by the tile size), blended linearly over the overlap, then cropped.

        Not equal to `decode` (each tile's GroupNorm and attention see only that tile), but without seams.
        """
        overlap_size = int(self.tile_latent_min_size * (1 - self.tile_overlap_factor))  # latent stride
        blend_extent = int(self.tile_sample_min_size * self.tile_overlap_factor)  # pixels blended per edge
        row_limit = self.tile_sample_min_size - blend_extent  # pixels kept per tile
        rows = _run_tiles(self._decode_tile, z, self.tile_latent_min_size, overlap_size)
        return _stitch(rows, blend_extent, row_limit)


class VAEEncoder(nn.Module):
    """AutoencoderKL's encode path. `config` is the dict of a diffusers vae/config.json (AutoencoderKL).

    Attributes: `config` (as VAEDecoder's), `encoder`, `quant_conv` (None when use_quant_conv is false, as in the
    Flux VAE), and the same tiling knobs as VAEDecoder (AutoencoderKL uses one set for both directions).
    Call encode/tiled_encode under torch.inference_mode(): nothing here turns autograd off.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = _vae_config(config, "down_block_types", "DownEncoderBlock2D", "VAEEncoder")
        self.encoder = Encoder(self.config)
        moments = 2 * self.config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if self.config.use_quant_conv else None
        self.tile_sample_min_size, self.tile_latent_min_size, self.tile_overlap_factor = _tile_sizes(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x)
        if self.quant_conv is not None:
            x = self.quant_conv(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) pixels in [-1, 1], in the module's dtype -> (B, 2 * latent_channels, H/8, W/8)
        moments (mean, then log-variance, along dim 1; H and W multiples of 8 for the Flux VAE's 4 blocks).

        = diffusers `vae.encode(x).latent_dist.parameters` (tiling and slicing off); `gaussian_mean_std` reads it.
        """
        return self._encode_tile(x)

    def tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """= diffusers `vae._tiled_encode(x)` (the moments; `tiled_encode(x).latent_dist.parameters`): pixel tiles
        of tile_sample_min_size, a stride of 3/4 of that, encoded one at a time (peak activation memory bounded by
        the tile), blended linearly over a quarter of a latent tile, then cropped.

        Not equal to `encode` (each tile's GroupNorm and attention see only that tile), but without seams.
        """
        overlap_size = int(self.tile_sample_min_size * (1 - self.tile_overlap_factor))  # pixel stride
        blend_extent = int(self.tile_latent_min_size * self.tile_overlap_factor)  # latents blended per edge
        row_limit = self.tile_latent_min_size - blend_extent  # latents kept per tile
        rows = _run_tiles(self._encode_tile, x, self.tile_sample_min_size, overlap_size)
        return _stitch(rows, blend_extent, row_limit)


def gaussian_mean_std(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2C, h, w) moments -> (mean, std), each (B, C, h, w), in the moments' dtype.

    As diffusers' DiagonalGaussianDistribution: the log-variance is clamped to [-30, 20], std = exp(logvar / 2).
    A sample of the latent distribution is mean + std * eps with eps ~ N(0, 1) of the mean's shape.
    """
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    return mean, torch.exp(0.5 * logvar)


def _run_tiles(fn, x: torch.Tensor, size: int, stride: int) -> list[list[torch.Tensor]]:
    """fn applied to x's (size x size) windows taken every `stride` along H then W: rows of outputs, top to bottom."""
    return [
        [fn(x[:, :, i : i + size, j : j + size]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]


def _stitch(rows: list[list[torch.Tensor]], blend_extent: int, row_limit: int) -> torch.Tensor:
    """Blend each tile with its upper and left neighbours over `blend_extent`, keep its first `row_limit` rows and
    columns, and concatenate: AutoencoderKL's tiled_encode / tiled_decode after the per-tile calls."""
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            # In place, in this order, as diffusers: a tile is blended into by its (already blended) upper and
            # left neighbours, and is itself the neighbour of later tiles.
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, blend_extent)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, blend_extent)
            result_row.append(tile[:, :, :row_limit, :row_limit])
        result_rows.append(torch.cat(result_row, dim=3))
    return torch.cat(result_rows, dim=2)


# Row by row with Python-float weights, as AutoencoderKL.blend_v/blend_h (a vectorised ramp rounds differently).
def _blend_v(a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
    """Fade the top `blend_extent` rows of b in from the bottom rows of a (the tile above); b is modified."""
    blend_extent = min(a.shape[2], b.shape[2], blend_extent)
    for y in range(blend_extent):
        b[:, :, y, :] = a[:, :, -blend_extent + y, :] * (1 - y / blend_extent) + b[:, :, y, :] * (y / blend_extent)
    return b


def _blend_h(a: torch.Tensor, b: torch.Tensor, blend_extent: int) -> torch.Tensor:
    """Fade the left `blend_extent` columns of b in from the right columns of a (the tile to the left)."""
    blend_extent = min(a.shape[3], b.shape[3], blend_extent)
    for x in range(blend_extent):
        b[:, :, :, x] = a[:, :, :, -blend_extent + x] * (1 - x / blend_extent) + b[:, :, :, x] * (x / blend_extent)
    return b
