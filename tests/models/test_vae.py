"""zimage.models.vae.VAEDecoder against diffusers' AutoencoderKL (the reference it re-implements).

The reference is the tiny Flux-style VAE of zimage/weights/tiny.py with its weights randomised a little (GroupNorm
weights 1 and biases 0 at init would hide a missing or swapped tensor); its decoder weights are copied into a
meta-constructed VAEDecoder with strict=True, assign=True, as the runtime loads them.
Measured on CPU (torch 2.13, diffusers 0.42.1): fp32 decode and tiled_decode, bf16 decode and channels_last all
differ from diffusers by exactly 0.0 (same ops in the same order); channels_last vs contiguous differs by ~1e-5
(NHWC conv kernels round differently, in diffusers too).
"""

from __future__ import annotations

import json

import pytest
import torch

from zimage.models.vae import VAEDecoder
from zimage.weights.tiny import TINY_VAE

FP32_ATOL = 1e-5


def _pair(seed: int = 0, **overrides):
    """(diffusers AutoencoderKL, VAEDecoder with the same decoder weights), both fp32, eval."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kwargs = dict(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, **TINY_VAE,
    )
    kwargs.update(overrides)
    vae = AutoencoderKL(**kwargs).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = json.loads(vae.to_json_string())  # what vae/config.json holds
    with torch.device("meta"):
        mine = VAEDecoder(config)
    state = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    mine.load_state_dict(state, strict=True, assign=True)
    return vae, mine.eval()


@pytest.fixture(scope="module")
def pair():
    return _pair()


@pytest.fixture(scope="module")
def z():
    # (B, C, h, w): batch 2, non-square so that a height/width mix-up shows.
    return torch.randn(2, 16, 12, 10, generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_state_dict_matches_diffusers_decoder(pair):
    vae, mine = pair
    ref = {k: v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant_conv."))}
    assert list(mine.state_dict()) == list(ref)  # same names, same order
    assert all(mine.state_dict()[k].shape == v.shape for k, v in ref.items())
    assert not list(mine.buffers())
    assert mine.post_quant_conv is None  # the Flux VAE has none


def test_config(pair):
    _, mine = pair
    assert mine.config.scaling_factor == 0.3611 and mine.config.shift_factor == 0.1159
    assert mine.config.block_out_channels == (32, 32, 32, 32) and mine.config.latent_channels == 16
    with torch.device("meta"):
        flux = VAEDecoder({"block_out_channels": [128, 256, 512, 512], "latent_channels": 16,
                           "up_block_types": ["UpDecoderBlock2D"] * 4, "shift_factor": None, "sample_size": 1024,
                           "use_post_quant_conv": False})
    assert flux.config.shift_factor == 0.0
    # AutoencoderKL's tiling defaults: 1024-pixel tiles = 128 latents, a quarter overlapping.
    assert (flux.tile_sample_min_size, flux.tile_latent_min_size, flux.tile_overlap_factor) == (1024, 128, 0.25)


@torch.inference_mode()
def test_decode_fp32_matches_diffusers(pair, z):
    vae, mine = pair
    ref = vae.decode(z, return_dict=False)[0]
    out = mine.decode(z)
    assert out.shape == (2, 3, 96, 80) == ref.shape
    assert _max_diff(out, ref) <= FP32_ATOL


@torch.inference_mode()
def test_tiled_decode_matches_diffusers(pair, z):
    vae, mine = pair
    # Defaults derive from the config exactly as diffusers derives them (tiny: sample_size 32).
    for name in ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor"):
        assert getattr(mine, name) == getattr(vae, name)
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    try:
        # 4-latent tiles with a stride of 3 over 12x10 latents: 4x4 tiles, blended in both directions.
        for m in (vae, mine):
            m.tile_sample_min_size, m.tile_latent_min_size = 32, 4
        ref = vae.tiled_decode(z, return_dict=False)[0]
        out = mine.tiled_decode(z)
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    assert out.shape == ref.shape == (2, 3, 96, 80)
    assert _max_diff(out, ref) <= FP32_ATOL
    assert _max_diff(out, mine.decode(z)) > 1e-2  # the tiles really were decoded separately


@torch.inference_mode()
def test_decode_bf16_close_to_diffusers(z):
    vae, mine = _pair()
    ref32 = vae.decode(z, return_dict=False)[0]
    vae, mine = vae.to(torch.bfloat16), mine.to(torch.bfloat16)
    zb = z.to(torch.bfloat16)
    ref = vae.decode(zb, return_dict=False)[0]
    out = mine.decode(zb)
    assert out.dtype == torch.bfloat16
    # Measured 0.0 on CPU; bf16 itself is ~0.1 off fp32 here, so 1e-2 still catches any real deviation.
    assert _max_diff(out, ref) <= 1e-2
    assert _max_diff(out, ref32) < 0.5


@pytest.mark.parametrize("overrides", [
    # post_quant_conv, channel changes (conv_shortcut), 8 groups of several channels, 3 resnets per up block
    dict(use_post_quant_conv=True, block_out_channels=(16, 32, 32, 64), norm_num_groups=8, layers_per_block=2),
    dict(mid_block_add_attention=False),
], ids=["post_quant_conv+shortcut", "no_mid_attention"])
@torch.inference_mode()
def test_config_variants_match_diffusers(overrides, z):
    vae, mine = _pair(seed=2, **overrides)
    ref_keys = [k for k in vae.state_dict() if k.startswith(("decoder.", "post_quant_conv."))]
    assert list(mine.state_dict()) == ref_keys
    if overrides.get("use_post_quant_conv"):
        assert mine.post_quant_conv is not None and any("conv_shortcut" in k for k in ref_keys)
    else:
        assert not any("attentions" in k for k in ref_keys)
    assert _max_diff(mine.decode(z), vae.decode(z, return_dict=False)[0]) <= FP32_ATOL
    for m in (vae, mine):
        m.tile_sample_min_size, m.tile_latent_min_size = 32, 4
    assert _max_diff(mine.tiled_decode(z), vae.tiled_decode(z, return_dict=False)[0]) <= FP32_ATOL


@torch.inference_mode()
def test_channels_last(z):
    vae, mine = _pair()
    ref = mine.decode(z)
    mine = mine.to(memory_format=torch.channels_last)
    vae = vae.to(memory_format=torch.channels_last)
    zc = z.to(memory_format=torch.channels_last)
    out = mine.decode(zc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert _max_diff(out, ref) <= 1e-4  # measured ~1e-5: NHWC convolutions round differently
    assert _max_diff(out, vae.decode(zc, return_dict=False)[0]) <= FP32_ATOL


def test_meta_construction():
    with torch.device("meta"):
        mine = VAEDecoder({"latent_channels": 16, "block_out_channels": [32, 64], "norm_num_groups": 32,
                           "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1})
    assert all(p.is_meta for p in mine.parameters()) and not list(mine.buffers())
    assert mine.post_quant_conv is not None  # diffusers' default: use_post_quant_conv=True
    assert mine.device.type == "meta" and mine.dtype == torch.float32


@pytest.mark.parametrize("key,value", [("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
                                       ("act_fn", "gelu")])
def test_rejects_unsupported_config(key, value):
    config = {"latent_channels": 16, "block_out_channels": [32, 32], "up_block_types": ["UpDecoderBlock2D"] * 2}
    config[key] = value
    bad = value[-1] if isinstance(value, list) else value
    with pytest.raises(ValueError, match=bad):
        VAEDecoder(config)
