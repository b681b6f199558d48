"""The flow-matching sampler of Z-Image-Turbo: schedule, initial noise, Euler steps, CFG. Free functions.

Schedule (diffusers >= 0.40 ZImagePipeline): N sigmas linspace(1, 1/N, N), shifted by the scheduler's
`shift` (3.0): s' = shift*s / (1 + (shift-1)*s), then a terminal 0. The transformer is called with
t = (1000 - 1000*s') / 1000 and predicts v; the Euler step is x <- x + (s'_{i+1} - s'_i) * (-v).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    sigmas: list[float]  # N+1 values, 1 -> 0, as float32-rounded python floats
    timesteps: object  # (N,) float32 tensor on the device: the model's t input, (1000 - 1000*sigma)/1000

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


def make_schedule(scheduler, steps: int, device) -> Schedule:
    """The model's schedule, computed by its own scheduler config (shift etc.), once per request."""
    import torch

    base = torch.linspace(1.0, 1.0 / steps, steps).tolist()
    # mu is what the reference passes; the Turbo scheduler has use_dynamic_shifting=False and ignores it.
    scheduler.set_timesteps(sigmas=base, device="cpu", mu=0.0)
    sigmas = scheduler.sigmas.to(torch.float32)  # (N+1,)
    t = scheduler.timesteps.to(torch.float32)  # (N,) = 1000 * sigma
    model_t = ((1000 - t) / 1000).to(device)
    return Schedule(sigmas.tolist(), model_t)


def initial_noise(seeds: list[int], channels: int, height: int, width: int, device):
    """(B, C, H/8, W/8) float32 noise; image i from its own CPU generator seeded seeds[i] (device independent)."""
    import torch

    shape = (1, channels, 2 * (height // 16), 2 * (width // 16))
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.cat(noise).to(device)


def euler_step(latents, velocity, sigma: float, sigma_next: float):
    """x_{i+1} = x_i + (s_{i+1} - s_i) * (-v). latents and velocity float32 (B, C, h, w)."""
    return latents + (sigma_next - sigma) * (-velocity)


def cfg_combine(pos, neg, scale: float):
    """Z-Image's CFG form (as the reference): pos + g * (pos - neg)."""
    return pos + scale * (pos - neg)
