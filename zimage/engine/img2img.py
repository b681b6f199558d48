"""Starting from a picture: the schedule, the noised start and the inpainting blend of img2img and inpainting, as
diffusers' ZImageImg2ImgPipeline and ZImageInpaintPipeline (0.42.1) compute them. Free functions; the engine's
loop calls them around its Euler steps (zimage.engine.sampling.euler_step).

Shapes: B images, C = 16 latent channels, pixels H x W (multiples of 16), latents h x w = H/8 x W/8.

**img2img.** The text-to-image schedule of N steps (sampling.make_schedule: N sigmas linspace(1, 1/N, N) shifted,
then a terminal 0) is cut by the strength S in (0, 1] as the pipeline's `get_timesteps` cuts it:
t_start = int(max(N - min(N * S, N), 0)); steps t_start .. N-1 run, i.e. N - t_start forwards (about N * S; at
least 1 for any S > 0), each with the sigmas and model times of the full schedule at that index. The start is the
encoded image noised to sigma[t_start] (the scheduler's `scale_noise`): x = s * noise + (1 - s) * z, where
z = (vae-latent - shift_factor) * scaling_factor. At S = 1, sigma[0] = 1 and x is the noise itself.

**Random draws (why zimage's seeds give the reference's images).** Image i of a request has its own CPU generator
seeded seed + i (as text-to-image). From it, in this order:
  1. eps_i ~ N(0, 1) of shape (1, C, h, w), float32: the sample of the VAE's latent distribution,
     vae-latent_i = mean + std * eps_i (the reference's `retrieve_latents(vae.encode(image), generator)`, whose
     default sample_mode is "sample": it does draw, it does not take the mode);
  2. noise_i ~ N(0, 1) of shape (1, C, h, w), float32: the noise of the start (and of every inpainting blend).
  (3. the inpainting reference then encodes the masked image with the same generator: a third draw, after the two
     that matter, for latents it never uses; zimage skips it, which changes nothing.)
This equals the reference called with `generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(B)]`
and the image repeated per output (`image=[picture] * B`, one prompt per image), and, for B = 1, with
`image=picture`. With one image and `num_images_per_prompt=B > 1` the reference instead samples one shared latent
from generator 0 and draws only the noise from generators 1.., so its image i > 0 differs from its own solo run;
zimage keeps the rule that image i equals the solo run with seed + i. The image is encoded once: its moments are
deterministic, and the B samples only differ by eps_i.
The draws are float32 on the CPU whatever the device and the VAE's dtype (the reference draws in the VAE's dtype:
identical in fp32).

**Inpainting.** The same start. After each Euler step i (to sigma[i+1]) the kept area is reset to the image noised
to sigma[i+1] with the same noise_i, and after the last step (sigma 0) to z itself:
    x = (1 - m) * (s' * noise + (1 - s') * z) + m * x
where m (1, 1, h, w) is the pixel mask (1 = repaint; the reference's mask processor binarises at 0.5) resized to
the latent grid with nearest interpolation, i.e. latent (y, x) takes the pixel (8y, 8x), the top-left one of its
8x8 cell. The reference also computes `masked_image_latents` (image * (mask < 0.5), encoded) but Z-Image's
transformer takes no mask input and the loop never reads them: the model sees only x.
So the final latents equal z exactly wherever m = 0: the kept area is the input after encode + decode.
"""

from __future__ import annotations

from dataclasses import dataclass

from zimage.engine.sampling import FlowMatchConfig, Schedule, make_schedule
from zimage.request import check_strength


def start_index(steps: int, strength: float) -> int:
    """The index of the first step that runs: `get_timesteps` of the reference pipelines, in Python floats as there
    (e.g. N=9: S=0.3 -> 6, i.e. 3 forwards; S=0.6 -> 3, 6 forwards; S=1 -> 0, all 9)."""
    init_timestep = min(steps * strength, steps)
    return int(max(steps - init_timestep, 0))  # the scheduler's order is 1: no factor


def img2img_schedule(config: FlowMatchConfig, steps: int, strength: float, device) -> tuple[Schedule, int]:
    """(the full N-step schedule, t_start): run steps t_start .. N-1 with schedule.sigmas[i], sigmas[i + 1] and
    schedule.timesteps[i]; the start latents are noised to schedule.sigmas[t_start]."""
    strength = check_strength(strength)
    schedule = make_schedule(config, steps, device)
    start = start_index(steps, strength)
    assert start < steps, (steps, strength)  # strength > 0 leaves at least one step
    return schedule, start


def image_generators(seeds: list[int]):
    """One CPU generator per image, seeded seed + i (what sampling.initial_noise uses for text-to-image)."""
    import torch

    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def encode_image_latents(vae_encoder, pixels, generators=None, tiled: bool = False):
    """pixels (1, 3, H, W) float in [-1, 1] -> z (B, C, h, w) float32 on the encoder's device, B = len(generators).

    z_i = (mean + std * eps_i - shift_factor) * scaling_factor with eps_i the next (1, C, h, w) float32 draw of
    generators[i] (the reference's `retrieve_latents` in its default "sample" mode); with generators None, the
    distribution's mean (B = 1; what `sample_mode="argmax"` gives, no draw). The image is encoded once, in the
    encoder's dtype; mean, std and the sample are float32. `tiled` encodes in overlapping tiles (large images on
    small memory budgets; not equal to the untiled encode, see VAEEncoder.tiled_encode).
    """
    import torch

    from zimage.models.vae import gaussian_mean_std

    if pixels.dim() != 4 or pixels.shape[0] != 1:
        raise ValueError(f"pixels must be (1, 3, H, W), got {tuple(pixels.shape)}")
    cfg = vae_encoder.config
    with torch.inference_mode():
        x = pixels.to(device=vae_encoder.device, dtype=vae_encoder.dtype)
        moments = vae_encoder.tiled_encode(x) if tiled else vae_encoder.encode(x)  # (1, 2C, h, w)
        mean, std = gaussian_mean_std(moments.float())  # (1, C, h, w) each
        if generators is None:
            samples = mean
        else:
            eps = torch.cat([torch.randn(mean.shape, generator=g, dtype=torch.float32) for g in generators])
            samples = mean + std * eps.to(mean.device)  # (B, C, h, w)
        return (samples - cfg.shift_factor) * cfg.scaling_factor


def draw_noise(generators, shape: tuple[int, int, int], device):
    """(B, C, h, w) float32: the next (1, C, h, w) standard normal draw of each generator, moved to `device`.

    shape = (C, h, w). Called after encode_image_latents with the same generators (draw 2 of each)."""
    import torch

    noise = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(noise).to(device)


def noised_start(image_latents, noise, sigma: float):
    """x = sigma * noise + (1 - sigma) * z, the scheduler's `scale_noise`; (B, C, h, w) float32.

    sigma is one of Schedule.sigmas (float32 values held as Python floats); it is made a float32 tensor first so
    that 1 - sigma is rounded to float32 as in the reference."""
    import torch

    s = torch.tensor(sigma, dtype=torch.float32, device=image_latents.device)
    return s * noise + (1.0 - s) * image_latents


@dataclass
class ImageStart:
    """What the loop needs from the picture, for B images. All (B, C, h, w) float32 on the encoder's device."""

    latents: object  # the noised start: noised_start(image_latents, noise, sigma[t_start])
    noise: object  # draw 2 of each image's generator (inpainting re-noises the kept area with it)
    image_latents: object  # z: the scaled sample of the encoded picture (draw 1)


def prepare_start(vae_encoder, pixels, seeds: list[int], sigma: float, tiled: bool = False) -> ImageStart:
    """The start of img2img / inpainting for the images seeded `seeds` (image i: seeds[i]), noised to `sigma`
    (= schedule.sigmas[t_start]); pixels (1, 3, H, W) in [-1, 1]. Draw order: see the module docstring."""
    generators = image_generators(seeds)
    z = encode_image_latents(vae_encoder, pixels, generators, tiled)  # draw 1 of each generator
    noise = draw_noise(generators, tuple(z.shape[1:]), z.device)  # draw 2
    return ImageStart(noised_start(z, noise, sigma), noise, z)


def latent_mask(mask, latent_size: tuple[int, int]):
    """(1, 1, H, W) pixel mask in {0, 1} (1 = repaint) -> (1, 1, h, w) float32 on the latent grid: nearest
    interpolation as the reference's prepare_mask_latents (latent (y, x) = pixel (y * H/h, x * W/w), floored)."""
    import torch.nn.functional as F

    return F.interpolate(mask.float(), size=tuple(latent_size), mode="nearest")


def inpaint_blend(latents, image_latents, noise, mask, sigma_next: float):
    """After the Euler step to sigma_next: the kept area (mask 0) replaced by the picture noised to sigma_next with
    the start's noise; at the last step (sigma_next = 0) by z itself, as the reference.

    latents, image_latents, noise (B, C, h, w) float32; mask (1, 1, h, w) from latent_mask (broadcast over B, C)."""
    proper = image_latents if sigma_next == 0.0 else noised_start(image_latents, noise, sigma_next)
    return (1 - mask) * proper + mask * latents
