"""Choosing the memory policy for an engine from its config, device and the checked model sizes."""

from __future__ import annotations

from zimage.memory.policy import MemoryPolicy, ResidentPolicy


def select_policy(config, device, dtype, checked) -> MemoryPolicy:
    return ResidentPolicy()


def describe_plan(args, device, dtype, checked) -> str:
    """One line per network: where it lives under the plan that would be chosen."""
    from zimage.engine.config import EngineConfig

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                          vram_budget_gib=getattr(args, "vram_budget", None))
    policy = select_policy(config, device, dtype, checked)
    return f"memory plan: {policy.describe()}"
