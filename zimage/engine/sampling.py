"""The flow-matching sampler of Z-Image-Turbo: schedule, initial noise, Euler steps, CFG. Free functions.

Schedule (diffusers >= 0.40 ZImagePipeline): N sigmas linspace(1, 1/N, N), shifted by the scheduler's
`shift` (3.0): s' = shift*s / (1 + (shift-1)*s), then a terminal 0. The transformer is called with
t = (1000 - 1000*s') / 1000 and predicts v; the Euler step is x <- x + (s'_{i+1} - s'_i) * (-v).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import ModelFolderError

# FlowMatchEulerDiscreteScheduler options that change the schedule; Z-Image-Turbo uses none of them. A folder that
# sets one is refused by name rather than sampled with a different schedule than its scheduler would give.
_UNSUPPORTED = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


@dataclass(frozen=True)
class FlowMatchConfig:
    """What the schedule needs from scheduler/scheduler_config.json (diffusers' FlowMatchEulerDiscreteScheduler)."""

    shift: float = 1.0
    num_train_timesteps: int = 1000

    @classmethod
    def from_file(cls, path: Path) -> "FlowMatchConfig":
        try:
            config = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"cannot read the scheduler config {path}: {e}") from None
        used = [k for k in _UNSUPPORTED if config.get(k)]
        if used:
            raise ModelFolderError(f"{path} sets {used[0]}={config[used[0]]!r}; zimage samples Z-Image's schedule "
                                   f"(a fixed shift) and supports none of {', '.join(_UNSUPPORTED)}")
        return cls(float(config.get("shift", 1.0)), int(config.get("num_train_timesteps", 1000)))


@dataclass(frozen=True)
class Schedule:
    sigmas: list[float]  # N+1 values, 1 -> 0, as float32-rounded python floats
    timesteps: object  # (N,) float32 tensor on the device: the model's t input, (1000 - 1000*sigma)/1000

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


def make_schedule(config: FlowMatchConfig, steps: int, device) -> Schedule:
    """The model's schedule, once per request; float32 throughout, op for op as the scheduler's set_timesteps."""
    import torch

    base = torch.linspace(1.0, 1.0 / steps, steps)  # (N,) float32
    shifted = config.shift * base / (1 + (config.shift - 1) * base)
    sigmas = torch.cat([shifted, torch.zeros(1)])  # (N+1,): a terminal 0
    t = shifted * config.num_train_timesteps  # (N,) = 1000 * sigma
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
