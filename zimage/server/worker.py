"""One worker thread owns the engine: it loads and warms it, then runs queued jobs, batching compatible ones.

Scheduling: FIFO. The job at the head of the queue always runs next (nothing starves); queued jobs that share
its batch key (size, steps, guidance, picture kind) join its batch, oldest first, up to `max_batch` images and at
most what the engine's memory plan fits at that size (Engine.batch_limit), with at most `lora_slots` different LoRA
sets (the engine's runtime slots mix sets in one batch): zimage.engine.batching, the rule Ray replicas use too.
Each image keeps its own seed, caption and LoRAs, so batching changes no image beyond float rounding (see
docs/server.md).
Cancellation: a queued job leaves the queue at once; a running one leaves its batch at the next step boundary.
Finished images are encoded (PNG ~0.15 s per 1024x1024 image) and stored by a small thread pool, not by the worker:
the GPU starts the next batch at once (a job stays 'running' in the store until its files are written).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from zimage.engine.batching import plan_groups
from zimage.errors import ZImageError
from zimage.request import GenerateRequest
from zimage.server.jobs import JobRecord, JobStore

log = logging.getLogger("zimage.server")


class Unavailable(Exception):
    """No job can run: the model failed to load or the worker stopped (a 503 naming why)."""


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


def request_from_params(params: dict, store=None) -> GenerateRequest:
    """The engine request of a stored job (seed already drawn, so a re-run makes the same images); its input
    pictures, if any, read back from `store` (zimage/server/inputs.py)."""
    req = GenerateRequest(prompts=(params["prompt"],), negative_prompt=params["negative_prompt"],
                          width=params["width"], height=params["height"], steps=params["steps"],
                          guidance=params["guidance"], seed=params["seed"], n=params["n"],
                          loras=tuple((lora["name"], lora["scale"]) for lora in params.get("loras", ())))
    if params.get("image_sha256"):
        from zimage.server.inputs import with_stored_inputs

        req = with_stored_inputs(req, params, store)
    return req


@dataclass
class _Pending:
    job_id: str
    params: dict
    request: GenerateRequest
    submitted: float  # time.time()
    cancel: threading.Event = field(default_factory=threading.Event)  # user cancel or server shutdown



class Worker:
    def __init__(self, store: JobStore, hub, metrics, settings, engine_loader):
        self.store, self.hub, self.metrics, self.settings = store, hub, metrics, settings
        self._loader = engine_loader  # () -> Engine; runs on the worker thread
        self.engine = None
        # "loading" -> "ok" after warm-up, or "failed" (the load failed, or the thread died outside a job). `detail`
        # is a few words for the public /health; `error` the cause, for the log and authenticated callers.
        self.state, self.detail, self.error = "loading", "loading the model", None
        self._pending: list[_Pending] = []  # queued jobs, oldest first
        self._running: dict[str, _Pending] = {}
        self._progress: dict[str, dict] = {}  # job id -> last progress event (for GET /v1/jobs/{id})
        self._cv = threading.Condition()
        self._stopping = False
        self._batch_seconds = 1.0  # moving average of an engine call (for Retry-After)
        self._thread = threading.Thread(target=self._main, name="zimage-worker", daemon=True)
        self._finisher = ThreadPoolExecutor(max(1, settings.encode_threads), thread_name_prefix="zimage-encode")

    # ---------------------------------------------------------------- called from the app
    def start(self) -> None:
        queued, failed = self.store.recover(self.settings.max_attempts)
        for job_id in failed:
            log.warning("job %s failed: interrupted %d times", job_id, self.settings.max_attempts)
        recovered = [(job, self._recovered_request(job)) for job in queued]
        with self._cv:
            for job, request in recovered:
                if request is not None:
                    self._pending.append(_Pending(job.id, job.params, request, job.created))
            self.metrics.queue_depth.set(len(self._pending))
        if queued:
            log.info("recovered %d queued job(s) from %s", len(queued), self.store.describe())
        self._thread.start()

    def _recovered_request(self, job) -> GenerateRequest | None:
        """A queued job's request, or None after failing the job (its stored input picture is gone or unreadable:
        that job fails, the others run)."""
        try:
            return request_from_params(job.params, self.store)
        except ZImageError as e:
            log.warning("job %s cannot run again: %s", job.id, e)
            self.store.fail(job.id, {"message": str(e), "type": "server_error", "code": "input_unavailable"})
            return None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step: running jobs go back to 'queued' (they run again at the next start)."""
        with self._cv:
            self._stopping = True
            for p in self._running.values():
                p.cancel.set()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._finisher.shutdown(wait=True)  # images of finished batches are written before we return

    def health(self) -> tuple[str, str | None]:
        """(state, detail). A worker thread that is gone is "failed" whatever it last said: /health must never say
        ok while nothing would run the jobs."""
        state, detail = self.state, self.detail
        if state != "failed" and self._thread.ident is not None and not self._thread.is_alive() and not self._stopping:
            return "failed", "the job worker stopped (see the server log)"
        return state, detail

    def unavailable(self) -> str | None:
        """Why no job can run now (the reason of a 503), or None: loading and warming up accept work."""
        state, detail = self.health()
        return f"the server cannot run jobs: {detail}" if state == "failed" else None

    def submit(self, params: dict, request: GenerateRequest) -> JobRecord:
        """Persist, then queue. Raises QueueFull when `max_queue` jobs are already waiting, Unavailable when no
        job can run (checked under the lock that a failing worker takes, so no job slips in after it failed)."""
        with self._cv:
            if (reason := self.unavailable()) is not None:
                raise Unavailable(reason)
            if len(self._pending) >= self.settings.max_queue:
                raise QueueFull(self.retry_after())
            job = self.store.add(params)  # committed before anyone hears the id
            self._pending.append(_Pending(job.id, params, request, job.created))
            self.metrics.queue_depth.set(len(self._pending))
            self._cv.notify()
        self.hub.publish(job.id, "queued", {"position": len(self._pending) - 1})
        return job

    def cancel(self, job_id: str) -> bool:
        """True if the job was queued or running and is now cancelled."""
        with self._cv:
            if not self.store.cancel(job_id):
                return False
            queued = [p for p in self._pending if p.job_id == job_id]
            for p in queued:
                self._pending.remove(p)
            if job_id in self._running:
                self._running[job_id].cancel.set()  # the engine drops its rows at the next step
            self.metrics.queue_depth.set(len(self._pending))
        self.metrics.jobs.labels("cancelled").inc()
        self.hub.publish(job_id, "cancelled", {})
        if queued:
            self._publish_positions()
        return True

    def position(self, job_id: str) -> int | None:
        with self._cv:
            for i, p in enumerate(self._pending):
                if p.job_id == job_id:
                    return i
        return None

    def progress(self, job_id: str) -> dict | None:
        return self._progress.get(job_id)

    def queue_length(self) -> int:
        return len(self._pending)

    def running_count(self) -> int:
        return len(self._running)

    def retry_after(self) -> int:
        batches = len(self._pending) / max(1, self.settings.max_batch) + 1
        return max(1, math.ceil(batches * self._batch_seconds))

    # ---------------------------------------------------------------- the thread
    def _main(self) -> None:
        try:
            self.engine = self._loader()
            self._warm_up()
        except Exception as e:  # noqa: BLE001 - reported by /health (in words), logged with its traceback
            log.exception("the engine could not be loaded")
            self._failed("the model could not be loaded (see the server log)", e)
            return
        self.state, self.detail = "ok", None
        log.info("ready: %s", self.engine.describe())
        # More than one loop only for an engine that runs calls side by side (settings.concurrent_batches).
        others = [threading.Thread(target=self._loop, name=f"zimage-worker-{i}", daemon=True)
                  for i in range(1, self.settings.concurrent_batches)]
        for t in others:
            t.start()
        self._loop()
        for t in others:
            t.join()

    def _loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except Exception as e:  # noqa: BLE001 - outside any job (e.g. the store failed): the server reports failed
            # Not restarted: what fails outside a job (the store, the disk) would most likely fail again at once.
            log.exception("the job worker stopped")
            self._failed("the job worker stopped after an error (see the server log)", e)

    def _failed(self, detail: str, exc: Exception) -> None:
        """From now on work is refused (503); jobs already queued stay queued in the store (a restart runs them)
        and the requests waiting on them are answered 503 (routes._wait, routes._stream)."""
        with self._cv:
            self.state, self.detail, self.error = "failed", detail, f"{type(exc).__name__}: {exc}"
            self._cv.notify_all()

    def _warm_up(self) -> None:
        if self.settings.warmup_size is None:
            return
        self.detail = "warming up"
        w, h = self.settings.warmup_size
        t0 = time.perf_counter()
        # Without the batch of 2 it compiles (Engine.warm_up), the first batches under load stalled on compilation
        # (measured on an H200: p99 22 s against 9.6 s, throughput 0.64x the engine alone).
        self.engine.warm_up(w, h, self.settings.warmup_steps, self.settings.max_batch)
        log.info("warm-up (%dx%d, %d steps) took %.2fs", w, h, self.settings.warmup_steps, time.perf_counter() - t0)

    def _next_batch(self) -> list[_Pending] | None:
        with self._cv:
            while not self._pending and not self._stopping:
                self._cv.wait()
            if self._stopping:
                return None
        if self.settings.batch_wait_s > 0:
            time.sleep(self.settings.batch_wait_s)  # let companions arrive
        with self._cv:
            if self._stopping or not self._pending:
                return [] if not self._stopping else None
            self._resolve_recipe()
            pending = list(self._pending)
            # the head's call (the head always runs, alone if need be): the first of the queue's grouping
            [first] = plan_groups([p.request for p in pending], self._lora_slots(), self._batch_cap, first_only=True)
            batch = [pending[i] for i in first]
            for p in batch:
                self._pending.remove(p)
            for p in batch:
                self._running[p.job_id] = p
            self.metrics.queue_depth.set(len(self._pending))
        return batch

    def _resolve_recipe(self) -> None:
        """Steps and guidance a job left to the model take the loaded engine's recipe (zimage.recipe), so that
        the batching key and progress compare what will run (an engine without one fills them itself)."""
        recipe = getattr(self.engine, "recipe", None)
        if recipe is not None:
            for p in self._pending:
                p.request = p.request.with_recipe(recipe)

    def _batch_cap(self, request: GenerateRequest) -> int:
        """Images per engine call: max_batch, and no more than the engine's memory plan fits at the request's size
        (Engine.batch_limit; the plan is made for one 1024x1024 image, so a full batch of large images would run
        out of memory into the leaner fallback plan). An engine without batch_limit (Ray replicas plan their own
        batches) is capped by max_batch only."""
        batch_limit = getattr(self.engine, "batch_limit", None)
        if batch_limit is None:
            return self.settings.max_batch
        fits = batch_limit(request.width, request.height, request.cfg, limit=self.settings.max_batch)
        return max(1, min(self.settings.max_batch, fits))

    def _lora_slots(self) -> int:
        """How many different per-request LoRA sets one engine call can hold (0: none)."""
        config = getattr(self.engine, "config", None) or self.settings.engine
        return config.lora_slots

    def _run(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        started = set(self.store.start([p.job_id for p in batch]))  # skips jobs cancelled just now
        batch = [p for p in batch if p.job_id in started]
        if not batch:
            return
        self._publish_positions()
        now = time.time()
        for p in batch:
            self.metrics.queue_wait.observe(now - p.submitted)
            self.hub.publish(p.job_id, "running", {"batch": len(batch)})
        self.metrics.running.inc(len(batch))
        self.metrics.batch_images.observe(sum(p.request.num_images for p in batch))
        t0 = time.perf_counter()
        try:
            results = self.engine.generate_many([p.request for p in batch], self._on_progress(batch),
                                                [p.cancel for p in batch])
        except Exception as e:  # noqa: BLE001 - every failure becomes a job error, never a dead worker
            self._fail(batch, e)
            return
        finally:
            self.metrics.running.dec(len(batch))
            with self._cv:
                for p in batch:
                    self._running.pop(p.job_id, None)
        seconds = time.perf_counter() - t0
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
        self.metrics.generation.observe(seconds)
        for p, result in zip(batch, results):
            self._progress.pop(p.job_id, None)
            if result is None:  # cancelled by the user (already recorded), or by a shutdown: run again later
                if self._stopping:
                    self.store.requeue(p.job_id)
                continue
            try:
                self._finisher.submit(self._finish, p, result).add_done_callback(_log_unexpected)
            except RuntimeError:  # the pool is shut down (stop() timed out while this batch ran): finish here
                self._finish(p, result)

    def _finish(self, p: _Pending, result) -> None:
        """Encoder thread: write the job's images, then mark it succeeded (or failed, e.g. disk full)."""
        from zimage.server.images import encode_image

        fmt, compression = p.params["output_format"], p.params.get("output_compression")
        images = []
        try:
            for img in result.images:
                name = self.store.image_name(p.job_id, img.index, fmt)
                self.store.write_image(name, encode_image(img.image, img.metadata, fmt, compression))
                images.append({"id": name, "index": img.index, "seed": img.metadata.seed})
        except Exception as e:  # noqa: BLE001 - e.g. disk full
            self._fail([p], e)
            return
        if self.store.succeed(p.job_id, images):
            log.info("job %s succeeded (%d image(s))", p.job_id, len(images))
            self.metrics.jobs.labels("succeeded").inc()
            self.metrics.images.inc(len(images))
            self.metrics.latency.observe(time.time() - p.submitted)
            self.hub.publish(p.job_id, "succeeded", {"images": images})

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        if len(batch) > 1:  # isolate the culprit: run each job alone (a bad one fails alone)
            log.warning("a batch of %d failed (%s); running its jobs one by one", len(batch), exc)
            for p in batch:
                self.store.requeue(p.job_id)
                with self._cv:
                    self._running[p.job_id] = p
                self._run([p])
            return
        p = batch[0]
        known = isinstance(exc, ZImageError)
        if not known:
            log.error("job %s failed", p.job_id, exc_info=exc)
        kind = _snake(type(exc).__name__)
        error = {"message": str(exc) if known else "generation failed (details are in the server log)",
                 "type": "server_error", "code": kind}
        self.metrics.errors.labels(kind).inc()
        if self.store.fail(p.job_id, error):
            self.metrics.jobs.labels("failed").inc()
            self.hub.publish(p.job_id, "failed", {"error": error})

    def _on_progress(self, batch: list[_Pending]):
        """Engine callback (worker thread): progress for each job, and now and then a small preview."""
        from zimage.server.images import latent_preview

        rows, start = {}, 0  # job id -> its rows in the batch's latents (valid while no job has left)
        for p in batch:
            rows[p.job_id] = (start, start + p.request.num_images)
            start += p.request.num_images
        every = max(1, (batch[0].request.steps or 1) // 4)  # steps None: an engine that fills the recipe itself

        def on_progress(prog) -> None:
            whole = not any(p.cancel.is_set() for p in batch)
            for p in batch:
                if p.cancel.is_set():
                    continue
                event = {"phase": prog.phase, "step": prog.step, "total": prog.total}
                self._progress[p.job_id] = event
                self.hub.publish(p.job_id, "progress", event)
                want = (self.settings.previews and whole and prog.phase == "denoise" and prog.latents is not None
                        and (prog.step % every == 0) and prog.step < prog.total)
                if want and self.hub.has_subscribers(p.job_id):
                    a, _ = rows[p.job_id]
                    self.hub.publish(p.job_id, "preview", {"step": prog.step, "image": latent_preview(prog.latents[a])})

        return on_progress

    def _publish_positions(self) -> None:
        with self._cv:
            waiting = [(p.job_id, i) for i, p in enumerate(self._pending)]
        for job_id, i in waiting:
            self.hub.publish(job_id, "queued", {"position": i})


def _log_unexpected(future) -> None:
    """Encoder-thread errors that _finish did not turn into a job error would otherwise vanish with the future."""
    if future.exception() is not None:
        log.error("finishing a job failed", exc_info=future.exception())


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))
