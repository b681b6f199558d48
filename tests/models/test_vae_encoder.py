"""zimage.models.vae.VAEEncoder against diffusers' AutoencoderKL encoder (the reference it re-implements), and its
checking/loading from a model folder (zimage.weights: OPTIONAL_BUILDERS["vae_encoder"]).

The reference is the tiny Flux-style VAE of zimage/weights/tiny.py with its weights randomised a little (GroupNorm
weights 1 and biases 0 at init would hide a missing or swapped tensor); its encoder weights are copied into a
meta-constructed VAEEncoder with strict=True, assign=True, as the runtime loads them.
"""

from __future__ import annotations

import json

import pytest
import torch

from zimage.models.vae import VAEEncoder, gaussian_mean_std
from zimage.weights.tiny import TINY_VAE

FP32_ATOL = 1e-5
ENCODER_KEYS = ("encoder.", "quant_conv.")


def _pair(seed: int = 0, **overrides):
    """(diffusers AutoencoderKL, VAEEncoder with the same encoder weights), both fp32, eval."""
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
        mine = VAEEncoder(config)
    state = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith(ENCODER_KEYS)}
    mine.load_state_dict(state, strict=True, assign=True)
    return vae, mine.eval()


@pytest.fixture(scope="module")
def pair():
    return _pair()


@pytest.fixture(scope="module")
def x():
    # (B, 3, H, W) pixels in [-1, 1]: batch 2, non-square so that a height/width mix-up shows.
    return torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_state_dict_matches_diffusers_encoder(pair):
    vae, mine = pair
    ref = {k: v for k, v in vae.state_dict().items() if k.startswith(ENCODER_KEYS)}
    assert list(mine.state_dict()) == list(ref)  # same names, same order
    assert all(mine.state_dict()[k].shape == v.shape for k, v in ref.items())
    assert "encoder.down_blocks.0.downsamplers.0.conv.weight" in ref and "encoder.mid_block.attentions.0.to_q.weight" in ref
    assert not list(mine.buffers())
    assert mine.quant_conv is None  # the Flux VAE has none


@torch.inference_mode()
def test_encode_fp32_matches_diffusers(pair, x):
    vae, mine = pair
    dist = vae.encode(x).latent_dist
    moments = mine.encode(x)
    assert moments.shape == (2, 32, 12, 10) == dist.parameters.shape
    assert _max_diff(moments, dist.parameters) <= FP32_ATOL
    mean, std = gaussian_mean_std(moments)
    assert _max_diff(mean, dist.mean) <= FP32_ATOL and _max_diff(std, dist.std) <= FP32_ATOL
    assert mean.abs().max() > 0.1 and std.min() > 0  # a real output


@torch.inference_mode()
def test_logvar_clamp():
    moments = torch.cat([torch.zeros(1, 2, 1, 1), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1)], dim=1)
    _, std = gaussian_mean_std(moments)
    assert torch.allclose(std.flatten(), torch.exp(0.5 * torch.tensor([-30.0, 20.0])))


@torch.inference_mode()
def test_tiled_encode_matches_diffusers(pair, x):
    vae, mine = pair
    for name in ("tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor"):
        assert getattr(mine, name) == getattr(vae, name)
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    try:
        # 32-pixel tiles (4 latents) with a stride of 24 over 96x80 pixels: 4x4 tiles, blended in both directions.
        for m in (vae, mine):
            m.tile_sample_min_size, m.tile_latent_min_size = 32, 4
        ref = vae._tiled_encode(x)
        ref_public = vae.tiled_encode(x).latent_dist.parameters
        out = mine.tiled_encode(x)
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    assert out.shape == ref.shape == (2, 32, 12, 10)
    assert _max_diff(out, ref) <= FP32_ATOL and _max_diff(out, ref_public) <= FP32_ATOL
    assert _max_diff(out, mine.encode(x)) > 1e-2  # the tiles really were encoded separately


@pytest.mark.parametrize("overrides", [
    # quant_conv, channel changes (conv_shortcut), 8 groups of several channels, 2 resnets per down block
    dict(use_quant_conv=True, block_out_channels=(16, 32, 32, 64), norm_num_groups=8, layers_per_block=2),
    dict(mid_block_add_attention=False),
    # 3 blocks: a factor of 4, not 8; 4 input channels
    dict(in_channels=4, block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
         up_block_types=("UpDecoderBlock2D",) * 3),
], ids=["quant_conv+shortcut", "no_mid_attention", "3_blocks_4_channels"])
@torch.inference_mode()
def test_config_variants_match_diffusers(overrides):
    vae, mine = _pair(seed=2, **overrides)
    ref_keys = [k for k in vae.state_dict() if k.startswith(ENCODER_KEYS)]
    assert list(mine.state_dict()) == ref_keys
    channels = overrides.get("in_channels", 3)
    x = torch.rand(1, channels, 64, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1
    if overrides.get("use_quant_conv"):
        assert mine.quant_conv is not None and any("conv_shortcut" in k for k in ref_keys)
    assert _max_diff(mine.encode(x), vae.encode(x).latent_dist.parameters) <= FP32_ATOL
    for m in (vae, mine):
        m.tile_sample_min_size, m.tile_latent_min_size = 32, 32 // 2 ** (len(vae.config.block_out_channels) - 1)
    assert _max_diff(mine.tiled_encode(x), vae._tiled_encode(x)) <= FP32_ATOL


@torch.inference_mode()
def test_encode_bf16_close_to_diffusers(x):
    vae, mine = _pair()
    ref32 = vae.encode(x).latent_dist.parameters
    vae, mine = vae.to(torch.bfloat16), mine.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    out = mine.encode(xb)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _max_diff(out, vae.encode(xb).latent_dist.parameters) <= 1e-2  # same ops in bf16
    assert _max_diff(out, ref32) < 0.5  # and bf16 is near fp32


@torch.inference_mode()
def test_encode_fp16_finite(x):
    """The engine runs the VAE in fp32 when the transformer is fp16 (the decoder overflows there); an fp16 encoder
    still gives finite moments near fp32 on these inputs where the CPU has fp16 convolutions."""
    _, mine = _pair()
    ref32 = mine.encode(x)
    half = mine.to(torch.float16)
    try:
        out = half.encode(x.to(torch.float16))
    except (RuntimeError, NotImplementedError) as e:  # a CPU build without fp16 conv kernels
        pytest.skip(f"fp16 convolutions not available on this CPU: {e}")
    assert torch.isfinite(out).all()
    assert _max_diff(out, ref32) < 0.1


@torch.inference_mode()
def test_channels_last(x):
    _, mine = _pair()
    ref = mine.encode(x)
    out = mine.to(memory_format=torch.channels_last).encode(x.to(memory_format=torch.channels_last))
    assert _max_diff(out, ref) <= 1e-4  # NHWC convolutions round differently


def test_meta_construction():
    with torch.device("meta"):
        mine = VAEEncoder({"latent_channels": 16, "block_out_channels": [32, 64], "norm_num_groups": 32,
                           "down_block_types": ["DownEncoderBlock2D"] * 2, "layers_per_block": 1})
    assert all(p.is_meta for p in mine.parameters()) and not list(mine.buffers())
    assert mine.quant_conv is not None  # diffusers' default: use_quant_conv=True
    assert mine.device.type == "meta" and mine.dtype == torch.float32
    assert mine.config.in_channels == 3


@pytest.mark.parametrize("key,value", [("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
                                       ("act_fn", "gelu")])
def test_rejects_unsupported_config(key, value):
    config = {"latent_channels": 16, "block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2}
    config[key] = value
    bad = value[-1] if isinstance(value, list) else value
    with pytest.raises(ValueError, match=bad):
        VAEEncoder(config)


# ---------------------------------------------------------------- from a model folder


def test_check_and_load_from_tiny_folder(tiny_folder):
    """The tiny folder's vae/ holds the encoder; check_network finds exactly the encoder's tensors, and the loaded
    encoder equals diffusers' AutoencoderKL.from_pretrained on the same folder."""
    from diffusers import AutoencoderKL

    from zimage.weights.check import check_model_folder, check_network
    from zimage.weights.load import load_network

    checked = check_network(tiny_folder, "vae_encoder")
    assert checked.tensors and all(k.startswith(ENCODER_KEYS) for k in checked.tensors)
    assert "vae_encoder" not in check_model_folder(tiny_folder)  # text-to-image does not check (or load) it
    encoder = load_network(checked, "cpu", torch.float32)
    reference = AutoencoderKL.from_pretrained(str(tiny_folder / "vae")).eval()
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.inference_mode():
        assert _max_diff(encoder.encode(x), reference.encode(x).latent_dist.parameters) <= FP32_ATOL


def test_folder_without_encoder_is_reported(model_copy):
    """A vae/ file with the decoder only (some converted checkpoints) passes for text-to-image but the encoder's
    check names the folder and the missing tensors."""
    from safetensors.torch import load_file, save_file

    from zimage.errors import ModelFolderError
    from zimage.weights.check import check_model_folder, check_network

    path = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("encoder.")}, path)
    check_model_folder(model_copy)
    with pytest.raises(ModelFolderError, match=r"vae lacks \d+ tensors the network needs: encoder\."):
        check_network(model_copy, "vae_encoder")
