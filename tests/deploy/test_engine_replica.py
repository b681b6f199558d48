"""The engine deployment's class, driven in-process (no Ray cluster): @serve.batch gathers concurrent calls into
engine calls, one per batch key; each call's stream is started, progress, then its result; an image made in a
batch is the image made alone (to the 1/255 the server's batching allows); a cancelled call is dropped."""

import asyncio
import types

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from zimage.deploy.engine_replica import EngineReplica  # noqa: E402
from zimage.request import GenerateRequest  # noqa: E402


class Counting:
    """Wraps the session's engine: records the requests of each generate_many call."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_many(self, requests, on_progress=None, cancels=None):
        self.calls.append([r.prompts[0] for r in requests])
        return self.engine.generate_many(requests, on_progress, cancels)


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module, as a replica has: @serve.batch's queue lives on the loop of its first call
    (per decorated method, not per instance)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def replica(engine, loop):
    """An EngineReplica whose Engine.load returns the session's tiny engine (loaded once for all tests)."""
    from types import SimpleNamespace

    from ray import serve

    from zimage.engine.engine import Engine

    counting = Counting(engine)
    with pytest.MonkeyPatch.context() as mp:
        # Outside a replica, @serve.batch's queue asks the (absent) replica context for max_ongoing_requests,
        # only to warn when it is below the batch size: answer as the deployment would.
        context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=16))
        mp.setattr(serve, "get_replica_context", lambda: context)
        mp.setattr(Engine, "load", classmethod(lambda cls, config: counting))
        r = EngineReplica(None, max_batch=8, batch_wait_s=0.2, warmup=(256, 256), warmup_steps=1)
        yield r, counting


@pytest.fixture
def fresh(replica):
    r, counting = replica
    counting.calls.clear()
    yield r, counting
    counting.generate_many = Counting.generate_many.__get__(counting)  # undo a test's stand-in


def req(prompt, size=256, steps=2, n=1, seed=7):
    return GenerateRequest(prompts=(prompt,), width=size, height=size, steps=steps, n=n, seed=seed)


async def collect(replica, request, cancel_after=None):
    events = []
    stream = replica.generate(request)
    async for kind, data in stream:
        events.append((kind, data))
        if cancel_after is not None and kind == "progress" and data["step"] == cancel_after:
            await stream.aclose()  # what Serve does to a call its caller cancelled
            break
    return events


def test_concurrent_calls_share_engine_calls_by_key(fresh, loop, engine):
    r, counting = fresh
    requests = [req("a"), req("b", n=2), req("c", size=272), req("d")]

    async def main():
        return await asyncio.gather(*(collect(r, q) for q in requests))

    streams = loop.run_until_complete(main())
    assert sorted(map(sorted, counting.calls)) == [["a", "b", "d"], ["c"]]  # 256s together, 272 apart
    for q, events in zip(requests, streams):
        kinds = [k for k, _ in events]
        assert kinds[0] == "started" and kinds[-1] == "result" and "progress" in kinds
        steps = [d["step"] for k, d in events if k == "progress" and d["phase"] == "denoise"]
        assert steps == [1, 2]
        latents = [d["latents"] for k, d in events if k == "progress" and d["latents"] is not None]
        assert latents and tuple(latents[0].shape[:2]) == (q.num_images, 3)
        result = events[-1][1]
        alone = engine.generate(q)
        for a, b in zip(result.images, alone.images):
            diff = np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_a_cancelled_call_is_dropped_and_the_others_finish(fresh, loop):
    r, counting = fresh

    async def main():
        return await asyncio.gather(collect(r, req("keep", steps=6)), collect(r, req("drop", steps=6), 1))

    kept, dropped = loop.run_until_complete(main())
    assert kept[-1][0] == "result" and len(kept[-1][1].images) == 1
    assert dropped[-1][0] == "progress"
    assert counting.calls == [["keep", "drop"]]


def test_an_engine_error_reaches_every_call_of_its_engine_call(fresh, loop):
    r, counting = fresh
    from zimage.errors import NonFiniteOutputError

    def boom(requests, on_progress=None, cancels=None):
        raise NonFiniteOutputError("the model produced NaN")

    counting.generate_many = boom

    async def main():
        return await asyncio.gather(collect(r, req("x")), collect(r, req("y")))

    for events in loop.run_until_complete(main()):
        kind, error = events[-1]
        assert kind == "error" and isinstance(error, NonFiniteOutputError) and "NaN" in str(error)


def test_a_foreign_error_travels_as_a_plain_runtime_error(fresh, loop):
    r, counting = fresh

    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}{b}")

    def odd(requests, on_progress=None, cancels=None):
        raise Odd(1, 2)

    counting.generate_many = odd
    events = loop.run_until_complete(collect(r, req("x")))
    kind, error = events[-1]
    assert kind == "error" and type(error) is RuntimeError and str(error) == "Odd: 12"


def test_plan_groups_splits_by_key_lora_slots_and_the_memory_plans_limit():
    from zimage.engine.batching import plan_groups

    def r(size=256, loras=(), n=1, strength=None):
        return GenerateRequest(prompts=("x",), width=size, height=size, steps=2, n=n, seed=1, loras=loras)

    a, b, c = ("a.safetensors", 0.5), ("b.safetensors", 1.0), ("c.safetensors", 1.0)
    reqs = [r(), r(loras=(a,)), r(loras=(b,)), r(loras=(a,)), r(loras=(c,)), r(512), r()]
    # two slots: the sets a and b share the first call (with the LoRA-less ones), c opens a second
    assert plan_groups(reqs, 2, lambda q: 8) == [[0, 1, 2, 3, 6], [4], [5]]
    # the memory plan fits 2 images: calls of at most 2, each request in the first call it fits; a request of 3
    # images runs alone, whole
    assert plan_groups([r(), r(), r(), r(n=3), r()], 4, lambda q: 2) == [[0, 1], [2, 4], [3]]
    # no runtime slots: a LoRA set runs alone (the engine refuses per-request sets then; its error reaches the call)
    assert plan_groups([r(loras=(a,)), r(loras=(b,))], 0, lambda q: 8) == [[0], [1]]
    # a queue that runs one call at a time (zimage serve's worker): only the head's call, and only its key asked
    asked = []
    assert plan_groups(reqs, 2, lambda q: asked.append(q.width) or 8, first_only=True) == [[0, 1, 2, 3, 6]]
    assert asked == [256]


def test_a_call_tagged_with_a_lora_set_reads_it_first_and_a_bad_one_is_that_calls_error(fresh, loop, monkeypatch):
    """RemoteEngine tags a request with LoRAs with its set (Serve's multiplexed model id): the replica reads the
    set's files before batching the call; a set that does not read answers this call with an error."""
    from zimage.deploy import engine_replica
    from zimage.deploy.remote_engine import lora_set_id
    from zimage.errors import ZImageError
    from zimage.lora_spec import check_loras

    r, counting = fresh
    # Serve's multiplex wrapper needs a live replica (its context, metrics): here the loader itself runs, unwrapped
    monkeypatch.setattr(r, "_hold_lora_set", types.MethodType(EngineReplica._hold_lora_set.__wrapped__, r))
    monkeypatch.setattr(engine_replica.serve, "get_multiplexed_model_id",
                        lambda: lora_set_id(check_loras(["absent.safetensors:0.5"])))
    events = loop.run_until_complete(collect(r, req("fox")))
    [(kind, error)] = events
    assert kind == "error" and isinstance(error, ZImageError) and "absent.safetensors" in str(error)
    assert counting.calls == []  # nothing ran
    monkeypatch.setattr(engine_replica.serve, "get_multiplexed_model_id", lambda: "")
    events = loop.run_until_complete(collect(r, req("fox")))
    assert events[-1][0] == "result"
