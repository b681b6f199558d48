"""Issue 14 item 9: a batch holds no more images than the engine's memory plan fits at its size
(Engine.batch_limit), so the first full batch under load does not run out of memory into the leaner fallback plan."""

from __future__ import annotations

from tests.server.conftest import GatedEngine

SIZE = 256


def body(**kw):
    return {"prompt": "a lighthouse", "size": f"{SIZE}x{SIZE}", "num_inference_steps": 2, **kw}


class TwoFit(GatedEngine):
    """The tiny engine, with a memory plan said to fit two images per call (at any size)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.asked = []  # (width, height, cfg, limit) of each batch_limit call

    def batch_limit(self, width, height, cfg=False, limit=64):
        self.asked.append((width, height, cfg, limit))
        return min(2, limit)


def images_per_call(c, gated, held_body, queued, wait_status) -> list[int]:
    """Hold the engine on one job, queue `queued` bodies behind it, release: each engine call's image count."""
    gated.gate.clear()
    first = c.post("/v1/jobs", json=held_body).json()
    assert gated.entered.acquire(timeout=30)
    jobs = [c.post("/v1/jobs", json=b).json() for b in queued]
    gated.gate.set()
    assert all(wait_status(c, j["id"])["status"] == "succeeded" for j in [first, *jobs])
    return [sum(r.num_images for r in call) for call in gated.calls]


def test_queued_jobs_run_in_batches_the_memory_plan_fits(make_client, engine, wait_status):
    capped = TwoFit(engine)
    c = make_client(engine_=capped, max_batch=8)
    queued = [body(seed=10 + i) for i in range(5)]
    assert images_per_call(c, capped, body(seed=1), queued, wait_status) == [1, 2, 2, 1]
    assert capped.asked and all(a == (SIZE, SIZE, False, 8) for a in capped.asked)


def test_guidance_asks_for_the_cfg_limit(make_client, engine, wait_status):
    capped = TwoFit(engine)
    c = make_client(engine_=capped)
    job = c.post("/v1/jobs", json=body(guidance_scale=2.0)).json()
    assert wait_status(c, job["id"])["status"] == "succeeded"
    assert capped.asked[-1][2] is True


def test_a_job_larger_than_the_limit_still_runs_whole(make_client, engine, wait_status):
    """The head of the queue always runs (nothing starves): n=3 on a plan for 2 is one call (the engine's own
    out-of-memory recovery is the guard there), and no companion joins it."""
    capped = TwoFit(engine)
    c = make_client(engine_=capped)
    queued = [body(n=3, seed=5), body(seed=9)]
    assert images_per_call(c, capped, body(seed=1), queued, wait_status) == [1, 3, 1]


def test_an_engine_without_batch_limit_is_capped_by_max_batch(make_client, engine, wait_status):
    """Ray's RemoteEngine has no batch_limit (its replicas plan their own batches): max_batch alone applies."""

    class NoLimit(GatedEngine):
        def __getattr__(self, name):
            if name == "batch_limit":
                raise AttributeError(name)
            return super().__getattr__(name)

    plain = NoLimit(engine)
    c = make_client(engine_=plain, max_batch=3)
    queued = [body(seed=10 + i) for i in range(4)]
    assert images_per_call(c, plain, body(seed=1), queued, wait_status) == [1, 3, 1]
