"""The budget a plan is chosen for, and the plan for a budget.

CUDA: budget = the user's `--vram-budget`, or the GPU's free memory less a margin -> `choose_plan`.
Other devices (CPU, MPS): everything resident (the plan is still computed, for `describe` and re-planning).
Plans are made for one image size and batch (the engine's default: one 1024x1024 image); a larger request that does
not fit is caught by the out-of-memory recovery (zimage.memory.oom), which re-plans leaner.
"""

from __future__ import annotations

from dataclasses import replace

from zimage.errors import UsageError
from zimage.memory.plan import GIB, MemoryPlan

FREE_MARGIN_BYTES = GIB  # left to other processes / the CUDA context when the budget is "what is free"


def check_budget(budget_gib: float | None) -> None:
    """A VRAM budget in GiB is a positive finite number (None: what is free)."""
    import math

    if budget_gib is None:
        return
    if isinstance(budget_gib, bool) or not isinstance(budget_gib, (int, float)) or not math.isfinite(budget_gib) \
            or budget_gib <= 0:
        raise UsageError(f"--vram-budget must be a positive number of GiB, got {budget_gib!r}", param="vram_budget")


def budget_bytes(budget_gib: float | None, device) -> int | None:
    """The VRAM budget in bytes: the given one, free VRAM less a margin on CUDA, None elsewhere (no budget)."""
    check_budget(budget_gib)
    if budget_gib is not None:
        return int(budget_gib * GIB)
    if device.type == "cuda":
        import torch

        if not torch.cuda.is_available():  # planning for a GPU from a machine without one (`zimage plan`)
            raise UsageError("no GPU is visible: give the budget to plan for with --vram-budget GIB",
                             param="vram_budget")
        free, _total = torch.cuda.mem_get_info(device)
        return max(free - FREE_MARGIN_BYTES, 0)
    return None


def plan_for(sizes, budget: int | None, width: int, height: int, batch: int, fp8: bool) -> MemoryPlan:
    """The fastest plan within `budget` bytes; with no budget (not a GPU), everything resident (its budget is then
    what it needs)."""
    from zimage.memory.planner import choose_plan, make_plan, minimum_budget

    if budget is None:
        n_text = len(sizes.text_encoder.blocks)
        plan = make_plan(sizes, 0, width, height, batch, 0, n_text, False, False, fp8)
        return replace(plan, budget_bytes=minimum_budget(plan))
    return choose_plan(budget, sizes, width, height, batch, fp8=fp8)
