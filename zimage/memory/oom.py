"""Out-of-memory recovery: a CUDA OOM during a generation frees what it took, drops to a leaner plan, retries once.

The note of what happened goes to the log (warning) and into each result's `warnings`. A second OOM raises
`OutOfMemory` (a ZImageError: a clear message, no traceback in the CLI); the engine keeps the leaner plan and
stays usable either way.
"""

from __future__ import annotations

import gc
import logging

from zimage.errors import ZImageError

log = logging.getLogger("zimage")

# Budgets tried for the leaner plan, as fractions of the failed plan's need at the request's size.
SHRINK = (0.85, 0.7, 0.5)


class OutOfMemory(ZImageError):
    """The GPU ran out of memory even with the leaner plan."""


def request_shape(requests) -> tuple[int, int, int]:
    """(width, height, rows through the transformer) of a batch: images x 2 with CFG."""
    first = requests[0]
    rows = sum(r.num_images * (2 if r.cfg else 1) for r in requests)
    return first.width, first.height, rows


def leaner_plan(plan, sizes, width: int, height: int, batch: int):
    """A plan that needs less than `plan` does at this request's size, or None if `plan` is already the leanest."""
    from zimage.memory.planner import choose_plan, leanest_plan, minimum_budget, same_placement

    now = same_placement(plan, sizes, width, height, batch)
    need = minimum_budget(now)
    for fraction in SHRINK:
        try:
            candidate = choose_plan(int(need * fraction), sizes, width, height, batch, plan.weight_dtype == "fp8")
        except ZImageError:
            continue
        if candidate.peak_bytes < now.peak_bytes:
            return candidate
    leanest = leanest_plan(sizes, width, height, batch, plan.weight_dtype == "fp8")
    if leanest.peak_bytes < now.peak_bytes:
        from dataclasses import replace

        return replace(leanest, budget_bytes=minimum_budget(leanest))
    return None


def free_memory(device) -> None:
    """Drop what the failed attempt allocated (its tensors die with the exception's frames)."""
    gc.collect()
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


def run_with_recovery(run, plan, sizes, requests, device, fall_back):
    """`run()` (a generation); on torch.OutOfMemoryError: free, re-plan leaner, `fall_back(leaner_plan)` (the
    engine re-places its networks under it: Engine.place), retry once.

    `plan` and `sizes` are the current placement's MemoryPlan and ModelSizes (None: nothing to re-plan)."""
    import torch

    try:
        return run()
    except torch.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
    free_memory(device)  # outside the except block: the traceback (and the tensors it holds) is gone
    width, height, batch = request_shape(requests)
    leaner = leaner_plan(plan, sizes, width, height, batch) if plan is not None and sizes is not None else None
    if leaner is None:
        described = plan.describe() if plan is not None else "no plan"
        raise OutOfMemory(
            f"out of GPU memory at {width}x{height} x{batch} under the leanest plan ({described}): {first}. "
            "Free GPU memory (other processes), or use a smaller size or fewer images per batch"
        )
    note = (f"out of GPU memory under plan '{plan.kind}' ({first}); switched to the leaner plan "
            f"'{leaner.kind}' ({leaner.describe()}) and retried")
    log.warning(note)
    fall_back(leaner)
    free_memory(device)
    try:
        results = run()
    except torch.OutOfMemoryError as e:
        second = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
    else:
        for r in results:
            if r is not None:
                r.warnings.append(note)
        return results
    free_memory(device)
    raise OutOfMemory(
        f"out of GPU memory at {width}x{height} x{batch} twice: under '{plan.kind}', then under the leaner "
        f"'{leaner.kind}' ({second}). The engine keeps the leaner plan; free GPU memory, lower --vram-budget, or "
        "use a smaller size or fewer images per batch"
    )
