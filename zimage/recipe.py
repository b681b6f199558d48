"""How a model wants to be run: the defaults of steps and guidance, by model.

- turbo (Tongyi-MAI/Z-Image-Turbo, distilled): 8 steps = 8 transformer forwards, no classifier-free guidance. Its
  authors' own pipeline runs 8; the model card's diffusers sample says `num_inference_steps=9` ("actually results in
  8 DiT forwards" in the diffusers of that time, which ended on a redundant step at sigma 0); diffusers >= 0.39 draws
  linspace(1, 1/N, N), so N = 8 gives the same 8 sigmas (the first 8 of linspace(1, 0, 9)).
- base (Tongyi-MAI/Z-Image, not distilled): classifier-free guidance and many steps; its card gives 28-50 steps and
  guidance 3-5 with negative prompts (zimage takes 50 and 4). Its scheduler config carries its own shift (6).

`--steps N` always means N transformer forwards (x2 with guidance > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from zimage.errors import UsageError


@dataclass(frozen=True)
class Recipe:
    name: str  # "turbo" | "base"
    steps: int  # default transformer forwards per image
    guidance: float  # default CFG scale (0: off)


TURBO = Recipe("turbo", 8, 0.0)
BASE = Recipe("base", 50, 4.0)
RECIPES = {r.name: r for r in (TURBO, BASE)}
RECIPE_CHOICES = ("auto",) + tuple(RECIPES)
BASE_SHIFT = 6.0  # Z-Image's scheduler shift (Turbo's is 3.0)


def recipe_named(name: str) -> Recipe | None:
    """The recipe `name` ('turbo' | 'base'), or None for 'auto'; UsageError for anything else."""
    if name == "auto":
        return None
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPE_CHOICES)}", param="recipe")
    return RECIPES[name]


def detect_recipe(model_id: str, scheduler_shift: float) -> tuple[Recipe, str]:
    """(recipe, why) for a model: by its repo id when it names one of the two, else by its scheduler's shift."""
    leaf = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
    if leaf == "z-image-turbo" or "turbo" in leaf:
        return TURBO, f"{model_id} is a Turbo model"
    if leaf == "z-image":
        return BASE, f"{model_id} is the non-distilled Z-Image"
    if scheduler_shift == BASE_SHIFT:
        return BASE, f"its scheduler's shift is {scheduler_shift:g}, as Z-Image's"
    return TURBO, f"its scheduler's shift is {scheduler_shift:g} (Turbo's is 3)"
