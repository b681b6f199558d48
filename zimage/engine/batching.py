"""Which queued requests share an engine call: the one grouping rule of zimage serve's worker and of a Ray
replica's @serve.batch (zimage.server.worker, zimage.deploy.engine_replica).

A call holds requests of one GenerateRequest.batch_key (size, steps, guidance, picture kind, strength), at most
`lora_slots` different per-request LoRA sets (the engine's runtime slots mix them in one call: zimage.engine.loras)
and at most the images the memory plan fits at that size (Engine.batch_limit). The first request always opens a
call and runs whole, even over the limit (nothing starves; the engine's out-of-memory recovery guards it).
"""

from __future__ import annotations


def lora_set(loras) -> tuple:
    """A request's LoRA set as ((name, scale), ...) sorted: the same for the same set in any order; () for none."""
    return tuple(sorted((spec.name, spec.scale) for spec in loras))


def plan_groups(requests, lora_slots: int, limit, first_only: bool = False) -> list[list[int]]:
    """The engine calls `requests` run as: lists of indices, each request in the first call it fits (arrival order
    otherwise). `limit(request)` is the most images of a call of that request's batch key; it is asked once per key.
    `first_only`: just the first request's call (a queue that runs one call at a time: other keys are not asked)."""
    limits: dict[tuple, int] = {}
    calls: list[tuple[tuple, list[int], list[int], set]] = []  # (batch key, members, [images], LoRA sets)
    for i, r in enumerate(requests):
        key, lset = r.batch_key(), lora_set(r.loras)

        def fits(call) -> bool:
            k, _, images, sets = call
            if k != key:
                return False
            new_set = bool(lset) and lset not in sets
            return images[0] + r.num_images <= limits[key] and not (new_set and len(sets) >= lora_slots)

        call = next((c for c in calls if fits(c)), None)
        if call is None and first_only and calls:
            continue
        if call is None:
            if key not in limits:  # asked when a key's first call opens
                limits[key] = limit(r)
            call = (key, [], [0], set())
            calls.append(call)
        call[1].append(i)
        call[2][0] += r.num_images
        if lset:
            call[3].add(lset)
    return [members for _, members, _, _ in calls]
