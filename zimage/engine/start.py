"""Where denoising starts for a batch: seeded noise (text-to-image), or each request's picture encoded and noised to
the first sigma its strength leaves (img2img), with the inpainting blend when the requests carry masks.

The random draws per image (seed + i, its own CPU generator) and the formulas are zimage.engine.img2img's; this
module only puts a batch together: requests in order, each request's images in order (as the engine's rows).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Inpaint:
    """The blend after each Euler step (zimage.engine.img2img.inpaint_blend), per row of the batch."""

    image_latents: object  # (B, C, h, w) float32: z, the encoded picture of each row
    noise: object  # (B, C, h, w) float32: each row's start noise
    mask: object  # (B, 1, h, w) float32 on the latent grid, 1 = repaint

    def __call__(self, latents, sigma_next: float):
        from zimage.engine.img2img import inpaint_blend

        return inpaint_blend(latents, self.image_latents, self.noise, self.mask, sigma_next)

    def rows(self, rows: list[int]) -> "Inpaint":
        """The blend of the rows still in the batch (cancelled images leave it)."""
        return Inpaint(self.image_latents[rows], self.noise[rows], self.mask[rows])


@dataclass
class Start:
    latents: object  # (B, C, h, w) float32 on the device
    step: int  # index of the first step of the schedule that runs
    blend: Inpaint | None = None  # inpainting only


def image_start(encoder, requests, scheduler, device, tiled: bool) -> Start:
    """The start of a batch of image requests (same size, steps and strength; each its own picture and mask)."""
    import torch

    from zimage.engine.img2img import img2img_schedule, latent_mask, prepare_start
    from zimage.io.input_image import image_to_tensor, mask_to_tensor

    first = requests[0]
    schedule, step = img2img_schedule(scheduler, first.steps, first.strength, device)
    starts, masks = [], []
    for r in requests:
        s = prepare_start(encoder, image_to_tensor(r.image.pixels), r.image_seeds(), schedule.sigmas[step], tiled)
        starts.append(s)
        h, w = s.latents.shape[2:]
        m = latent_mask(mask_to_tensor(r.mask.pixels), (h, w)) if r.mask is not None else torch.ones(1, 1, h, w)
        masks.append(m.to(s.latents.device).expand(r.num_images, -1, -1, -1))
    latents = torch.cat([s.latents for s in starts]).to(device)
    blend = None
    if any(r.mask is not None for r in requests):
        blend = Inpaint(torch.cat([s.image_latents for s in starts]).to(device),
                        torch.cat([s.noise for s in starts]).to(device), torch.cat(masks).to(device))
    return Start(latents, step, blend)
