"""Choosing the memory policy for an engine from its config, device and the checked model sizes.

CUDA: budget = `config.vram_budget_gib`, or the GPU's free memory less a margin -> `choose_plan` -> PlannedPolicy.
Other devices (CPU, MPS): everything resident (the plan is still computed, for `describe` and OOM re-planning).
Plans are made for the default image (1024x1024, one image); a larger request that does not fit is caught by the
out-of-memory recovery (zimage.memory.oom), which re-plans leaner.
"""

from __future__ import annotations

from zimage.memory.plan import GIB
from zimage.memory.policy import MemoryPolicy

FREE_MARGIN_BYTES = GIB  # left to other processes / the CUDA context when the budget is "what is free"
PLAN_WIDTH = PLAN_HEIGHT = 1024


def budget_bytes(config, device) -> int | None:
    """The VRAM budget in bytes: the configured one, free VRAM less a margin on CUDA, None elsewhere."""
    if config.vram_budget_gib is not None:
        if config.vram_budget_gib <= 0:
            from zimage.errors import UsageError

            raise UsageError(f"--vram-budget must be positive (GiB), got {config.vram_budget_gib}", param="vram_budget")
        return int(config.vram_budget_gib * GIB)
    if device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return max(free - FREE_MARGIN_BYTES, 0)
    return None


def plan_for(config, device, dtype, checked, width: int = PLAN_WIDTH, height: int = PLAN_HEIGHT, batch: int = 1):
    """(MemoryPlan, ModelSizes) the engine would use."""
    from zimage.memory.planner import choose_plan, make_plan, minimum_budget
    from zimage.memory.sizes import model_sizes

    sizes = model_sizes(checked, dtype.itemsize, config.max_text_tokens)
    budget = budget_bytes(config, device) if device.type == "cuda" or config.vram_budget_gib is not None else None
    if budget is None:  # not a GPU: all resident, its budget is what it needs
        n_text = len(sizes.text_encoder.blocks)
        plan = make_plan(sizes, 0, width, height, batch, 0, n_text, False, False, config.fp8)
        from dataclasses import replace

        return replace(plan, budget_bytes=minimum_budget(plan)), sizes
    return choose_plan(budget, sizes, width, height, batch, fp8=config.fp8), sizes


def select_policy(config, device, dtype, checked) -> MemoryPolicy:
    from zimage.memory.planned import PlannedPolicy

    if device.type != "cuda":
        config = _without_budget(config)  # CPU/MPS: resident (a budget names GPU memory)
    plan, sizes = plan_for(config, device, dtype, checked)
    return PlannedPolicy(plan, sizes)


def describe_plan(args, device, dtype, checked) -> str:
    """The plan that would be chosen, in one line (for `zimage info` and `zimage plan`)."""
    from zimage.engine.config import EngineConfig

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          vram_budget_gib=getattr(args, "vram_budget", None), fp8=getattr(args, "fp8", False))
    plan, _ = plan_for(config, device, dtype, checked, getattr(args, "width", PLAN_WIDTH),
                       getattr(args, "height", PLAN_HEIGHT))
    return f"memory plan: {plan.describe()}"


def _without_budget(config):
    from dataclasses import replace

    return replace(config, vram_budget_gib=None) if config.vram_budget_gib is not None else config
