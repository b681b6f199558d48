"""Latents -> pixels with the Flux VAE decoder, one image at a time (bounded activation memory)."""

from __future__ import annotations


def decode_latents(vae, latents, tile: bool = False):
    """(B, 16, h, w) float32 latents -> (B, 3, 8h, 8w) float32 in [0, 1] on the VAE's device.

    x = latents / scaling + shift (the Flux VAE's normalisation), decoded in the VAE's dtype.
    `tile=True` decodes in overlapping tiles (as diffusers' tiled decode) for large images on small budgets.
    """
    import torch

    cfg = vae.config
    dtype = vae.dtype
    out = []
    with torch.inference_mode():
        for one in latents.split(1):
            z = (one / cfg.scaling_factor + cfg.shift_factor).to(dtype)
            image = vae.tiled_decode(z) if tile else vae.decode(z)
            out.append((image.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def to_pil(pixels) -> list:
    """(B, 3, H, W) float [0, 1] -> list of RGB PIL images (rounded as diffusers' image processor does)."""
    from PIL import Image

    arr = (pixels.permute(0, 2, 3, 1) * 255).round().to("cpu").numpy().astype("uint8")  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arr]
