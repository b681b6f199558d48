"""RemoteEngine: what the server's worker calls in place of a local Engine when the engines are Ray Serve replicas.

It has the part of Engine's interface that zimage.server.worker uses (generate_many, generate, describe, speed,
device), so the ingress runs the server's own app, worker and job store unchanged. Each request is one streaming
call to the engine deployment (Serve routes it to a replica and batches it there); its events become the worker's
progress callbacks, its result the worker's result.

A replica that dies under a call (ray.kill, kill -9, a lost node):
- before the call's engine run began (it waited in the replica's queue): sent again, not counted as a run;
- during its run: run once more, on whichever replica Serve routes it to (the stored seed makes the same images);
- a second death during a run, or no replica reachable for UNREACHABLE_S: EngineUnavailable, which the job
  records (code engine_unavailable; a synchronous caller hears 503).
"""

from __future__ import annotations

import logging
import threading
import time

from zimage.errors import ZImageError

log = logging.getLogger("zimage.deploy")

RERUNS = 1  # runs repeated after their replica died mid-run
UNREACHABLE_S = 60.0  # how long a call may find no live replica before its job fails
CANCEL_POLL_S = 0.2  # how soon a cancelled job's call is cancelled at the replica


class EngineUnavailable(ZImageError):
    """No engine replica could run the request (they died under it, or none is reachable)."""


class RemoteEngine:
    device = None  # no local GPU to report in /metrics

    def __init__(self, handle):
        self._handle = handle.options(stream=True)
        self._describe_handle = handle
        self._info: dict = {}
        self.speed = None
        self.reruns = 0  # runs repeated after a replica died (for tests and logs)

    def wait_ready(self, timeout: float = 3600.0) -> "RemoteEngine":
        """Until a replica answers (Serve routes to a replica only once its engine is loaded and warm)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._info = self._describe_handle.describe.remote().result(timeout_s=30)
                break
            except Exception as e:  # noqa: BLE001 - replicas still starting; the deadline bounds it
                if time.monotonic() > deadline:
                    raise EngineUnavailable(f"no engine replica became ready in {timeout:.0f}s") from e
                log.info("waiting for an engine replica (%s)", type(e).__name__)
                time.sleep(1.0)
        self._info.pop("pid", None)
        self.speed = self._info.get("speed")
        return self

    def describe(self) -> dict:
        return {**self._info, "backend": "ray"}

    @property
    def recipe(self):
        """The replicas' recipe (zimage.recipe.Recipe), from their description: the server's worker fills the steps
        and guidance a job left to the model with it, as it does for a local engine."""
        from zimage.recipe import Recipe

        r = self._info.get("recipe")
        return Recipe(r["name"], r["steps"], r["guidance"]) if r else None

    def generate(self, request, on_progress=None, cancel=None):
        from zimage.errors import GenerationCancelled

        result = self.generate_many([request], on_progress, [cancel])[0]
        if result is None:
            raise GenerationCancelled("the generation was cancelled")
        return result

    def generate_many(self, requests, on_progress=None, cancels=None) -> list:
        """Each request goes to the engine deployment on its own (Serve batches them on the replicas). Progress is
        reported for a single request (the server's Ray ingress sends one job per call)."""
        cancels = list(cancels or [None] * len(requests))
        if len(requests) == 1:
            return [self._run(requests[0], on_progress, cancels[0])]
        results, errors = [None] * len(requests), []

        def one(j):
            try:
                results[j] = self._run(requests[j], None, cancels[j])
            except Exception as e:  # noqa: BLE001 - re-raised below, on the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=one, args=(j,), daemon=True) for j in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def _handle_for(self, request):
        """The handle a request is sent through: with LoRAs, tagged with its set (Serve's multiplexed model id), so
        Serve prefers a replica whose slots already hold it (zimage.deploy.engine_replica._hold_lora_set)."""
        if not request.loras:
            return self._handle
        return self._handle.options(multiplexed_model_id=lora_set_id(request.loras))

    def _run(self, request, on_progress, cancel):
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import RequestCancelledError

        reruns, unreachable_since = 0, None
        while True:
            if cancel is not None and cancel.is_set():
                return None
            started = False
            stream = self._handle_for(request).generate.remote(request)
            watch = _CancelWatch(stream, cancel)
            try:
                for kind, data in stream:
                    if kind == "started":
                        started, unreachable_since = True, None
                    elif kind == "progress":
                        if on_progress is not None:
                            on_progress(_progress(data))
                    elif kind == "result":
                        return data
                    elif kind == "error":
                        raise data
                raise EngineUnavailable("the engine replica ended the call without a result")
            except RequestCancelledError:
                return None
            except (RayActorError, ActorUnavailableError) as e:
                if cancel is not None and cancel.is_set():
                    return None
                if started:
                    if reruns >= RERUNS:
                        raise EngineUnavailable("engine replicas died twice while running this request") from e
                    reruns += 1
                    self.reruns += 1
                    log.warning("the engine replica running a request died (%s); running it again", type(e).__name__)
                    continue
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > UNREACHABLE_S:
                    raise EngineUnavailable(f"no engine replica reachable for {UNREACHABLE_S:.0f}s") from e
                time.sleep(0.5)  # Serve's routing table drops the dead replica within moments
            finally:
                watch.stop()


class _CancelWatch:
    """Cancels calls at the replica when their job is cancelled (a stream only moves at step boundaries, and not
    at all while its call waits for a replica). One thread watches every call in flight."""

    _lock = threading.Lock()
    _watched: dict[int, tuple] = {}
    _thread: threading.Thread | None = None

    def __init__(self, stream, cancel):
        self._key = id(self)
        if cancel is None:
            return
        cls = type(self)
        with cls._lock:
            cls._watched[self._key] = (stream, cancel)
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._main, name="zimage-cancel-watch", daemon=True)
                cls._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._watched.pop(self._key, None)

    @classmethod
    def _main(cls) -> None:
        while True:
            time.sleep(CANCEL_POLL_S)
            with cls._lock:
                hit = [(k, stream) for k, (stream, cancel) in cls._watched.items() if cancel.is_set()]
                for k, _ in hit:
                    del cls._watched[k]
            for _, stream in hit:
                stream.cancel()


def _progress(data: dict):
    from zimage.engine.result import Progress

    return Progress(data["phase"], data["step"], data["total"], data.get("latents"))


def lora_set_id(loras) -> str:
    """A LoRA set as one string, the same for the same set in any order: JSON [[name, scale], ...] sorted (the
    replica reads it back: zimage.deploy.engine_replica._hold_lora_set)."""
    import json

    from zimage.engine.batching import lora_set

    return json.dumps(lora_set(loras))
