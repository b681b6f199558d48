"""The engine deployment: one Engine per Ray Serve replica, loaded once and warmed up in __init__ (Serve routes
nothing to a replica before its constructor returns), fed through `@serve.batch` into `Engine.generate_many`.

Calls arrive one request each (`generate`, a streaming method: Serve's router spreads them over replicas, counts
them for autoscaling and holds back what exceeds `max_ongoing_requests`). `@serve.batch` gathers the calls that
wait on one replica into a batch; requests that cannot share an engine call (another size, step count, guidance
or kind of picture input, more LoRA sets than the runtime slots, more images than the memory plan fits) run one
group after another within it (zimage.engine.batching.plan_groups, as zimage serve's worker). Each call's stream yields, in order:
    ("started", {"pid"})                 its engine call began (a failure before this was not a run)
    ("progress", {"phase", "step", "total", "latents"})   at step boundaries (not every one: see on_progress);
                                         latents (n, 3, <=64, <=64) at quarter steps, for previews, while no
                                         request of the engine call was cancelled
    ("result", GenerateResult | None)    None: cancelled
or  ("error", exception)                 the engine raised (the replica logs the traceback)
A caller that cancels its call (the ingress, for a cancelled job) has its rows dropped at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from ray import serve

log = logging.getLogger("zimage.deploy")

PREVIEW_SIDE = 64  # what zimage.server.images.latent_preview makes of latents anyway
PROGRESS_EVERY_S = 1.0  # between progress events of an engine call, quarter steps aside


@dataclass
class _Call:
    request: object  # GenerateRequest
    cancel: threading.Event = field(default_factory=threading.Event)


# LoRA sets a replica tells Serve it holds (its multiplexed model ids; the decorator needs the number up front):
# zimage serve's default --lora-slots. A replica with more slots still keeps more sets (its own LRU); Serve routes
# by the last four it heard of.
MULTIPLEXED_SETS = 4

# Images per engine call. Set by the replica's constructor: a batch_size_fn is fixed when the method is decorated,
# and each replica is a process of its own, so a module value is this replica's setting.
_max_batch = 8


def _images(calls: list[_Call]) -> int:
    # Batch size in images, a request larger than a whole batch counting as one whole batch (Serve refuses an
    # item bigger than max_batch_size; the engine runs such a request alone, as zimage serve's worker does).
    return sum(min(c.request.num_images, _max_batch) for c in calls)


class EngineReplica:
    """Wrapped by zimage.deploy.ray_app with the deployment's options (GPUs, autoscaling, max_ongoing_requests)."""

    def __init__(self, engine_config, max_batch: int = 8, batch_wait_s: float = 0.0, warmup=None,
                 warmup_steps: int = 2, torch_threads: int | None = None):
        import torch

        from zimage.engine.engine import Engine

        if torch_threads:
            # Process-wide, and this process is this replica's alone (a Ray actor): one engine, one thread pool.
            torch.set_num_threads(torch_threads)
        global _max_batch
        _max_batch = max_batch
        self._batched.set_max_batch_size(max_batch)
        self._batched.set_batch_wait_timeout_s(batch_wait_s)
        self.engine = Engine.load(engine_config)
        if warmup is not None:
            w, h = warmup
            self.engine.warm_up(w, h, warmup_steps, max_batch)  # the graphs the first batches would stall on
        log.info("replica ready (pid %d): %s", os.getpid(), self.engine.describe())

    def describe(self) -> dict:
        return {**self.engine.describe(), "pid": os.getpid()}

    def pid(self) -> int:
        return os.getpid()

    async def generate(self, request):
        """One request's stream (see the module docstring)."""
        if lora_set := serve.get_multiplexed_model_id():  # (RemoteEngine names a request's LoRA set so)
            try:
                await self._hold_lora_set(lora_set)
            except Exception as e:  # noqa: BLE001 - a LoRA that does not read is this call's error, not the replica's
                yield ("error", _portable(e))
                return
        call = _Call(request.with_recipe(self.engine.recipe))  # steps/guidance left None: grouped as they will run
        answered = False
        try:
            # Read to the end even once answered: Serve's batch hands every call an item per step of the batch
            # (None while another group runs), and leaves an unread one as an exception nobody retrieved.
            async for item in self._batched(call):
                if item is None or answered:
                    continue
                yield item
                answered = item[0] in ("result", "error")
        finally:
            call.cancel.set()  # the caller went away (cancelled): the engine drops its rows at the next step

    @serve.multiplexed(max_num_models_per_replica=MULTIPLEXED_SETS)
    async def _hold_lora_set(self, lora_set: str) -> str:
        """Serve's model multiplexing, for LoRA sets: once a replica has run a set, Serve routes that set's next
        requests to it first, so each replica's runtime slots keep serving the sets they hold instead of every
        replica cycling through all of them. Reads the set's files into the engine's cache (a bad name or file
        fails here, before the call is batched); the slot itself is written when the set's batch runs."""
        import json

        from zimage.lora_spec import check_loras

        specs = check_loras([tuple(pair) for pair in json.loads(lora_set)])  # zimage.deploy.remote_engine.lora_set_id
        await asyncio.to_thread(self.engine.loras.resolve, specs, self.engine.config.lora_names_only)
        return lora_set

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0, batch_size_fn=_images)
    async def _batched(self, calls: list[_Call]):
        """Yields one item per call each time (Serve's streaming batch protocol): the call's next event, None
        for a call whose group is not running, StopIteration for a call already answered."""
        from zimage.engine.batching import plan_groups

        engine = self.engine
        finished: set[int] = set()
        for members in plan_groups([c.request for c in calls], engine.config.lora_slots,
                                   lambda r: engine.batch_limit(r.width, r.height, r.cfg, limit=_max_batch)):
            async for items in self._run_group(calls, members):
                yield [StopIteration if i in finished else items.get(i) for i in range(len(calls))]
            finished.update(members)

    async def _run_group(self, calls: list[_Call], members: list[int]):
        """One engine call for `members` (on a thread: the replica's event loop keeps taking calls and health
        checks); yields {call index: event}."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        mine = [calls[i] for i in members]
        rows, start = {}, 0
        for i in members:
            rows[i] = (start, start + calls[i].request.num_images)
            start += calls[i].request.num_images

        quarter = max(1, calls[members[0]].request.steps // 4)
        last_sent = [0.0]

        def on_progress(prog) -> None:  # engine thread
            # Each event is a message through Ray to the ingress: one every step cut a tiny CPU replica from 1.93
            # to 1.58 images/s (20 steps, one probe). Sent: phase changes, the last step, the quarter steps (where
            # the server takes previews, with the latents), and otherwise at most one every PROGRESS_EVERY_S.
            now = time.monotonic()
            key_step = prog.phase != "denoise" or prog.step == prog.total or prog.step % quarter == 0
            if not key_step and now - last_sent[0] < PROGRESS_EVERY_S:
                return
            last_sent[0] = now
            whole = not any(c.cancel.is_set() for c in mine)
            wanted = whole and prog.latents is not None and prog.step % quarter == 0
            small = _shrink(prog.latents) if wanted else None
            loop.call_soon_threadsafe(events.put_nowait, ("progress", prog, small))

        def run():
            try:
                return self.engine.generate_many([c.request for c in mine], on_progress, [c.cancel for c in mine])
            finally:
                loop.call_soon_threadsafe(events.put_nowait, ("done", None, None))

        yield {i: ("started", {"pid": os.getpid()}) for i in members}
        future = loop.run_in_executor(None, run)
        while True:
            kind, prog, small = await events.get()
            if kind == "done":
                break
            yield {i: ("progress", {"phase": prog.phase, "step": prog.step, "total": prog.total,
                                    "latents": None if small is None else small[a:b]})
                   for i, (a, b) in rows.items() if not calls[i].cancel.is_set()}
        try:
            results = await future
        except Exception as e:  # noqa: BLE001 - every caller of the group hears it; the log keeps the traceback
            log.exception("an engine call of %d request(s) failed", len(mine))
            yield {i: ("error", _portable(e)) for i in members}
            return
        yield {i: ("result", result) for i, result in zip(members, results)}


def _shrink(latents):
    """(B, 16, h, w) -> (B, 3, <=64, <=64) on the CPU: the channels and size a preview uses, ~50 KB an image
    instead of a full latent per step through Ray's object store."""
    import torch.nn.functional as F

    x = latents[:, :3].float()
    h, w = x.shape[-2:]
    if max(h, w) > PREVIEW_SIDE:
        scale = PREVIEW_SIDE / max(h, w)
        x = F.adaptive_avg_pool2d(x, (max(1, round(h * scale)), max(1, round(w * scale))))
    return x.cpu()


def _portable(error: Exception) -> Exception:
    """The engine's own errors (ZImageError: a message meant for the user) travel as they are; anything else as a
    plain RuntimeError naming its type, so that the ingress never needs to unpickle a foreign exception class."""
    import pickle

    from zimage.errors import ZImageError

    if isinstance(error, ZImageError):
        try:
            pickle.loads(pickle.dumps(error))
            return error
        except Exception:  # noqa: BLE001 - an error class with an unusual constructor
            return ZImageError(str(error))
    return RuntimeError(f"{type(error).__name__}: {error}")
