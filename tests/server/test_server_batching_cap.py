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


def test_queued_jobs_run_in_batches_the_memory_plan_fits(make_client, engine, wait_status):
    capped = TwoFit(engine)
    c = make_client(engine_=capped, max_batch=8)
    capped.gate.clear()
    first = c.post("/v1/jobs", json=body(seed=1)).json()
    assert capped.entered.acquire(timeout=30)
    jobs = [c.post("/v1/jobs", json=body(seed=10 + i)).json() for i in range(5)]
    capped.gate.set()
    assert all(wait_status(c, j["id"])["status"] == "succeeded" for j in [first, *jobs])
    assert [sum(r.num_images for r in call) for call in capped.calls] == [1, 2, 2, 1]
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
    capped.gate.clear()
    first = c.post("/v1/jobs", json=body(seed=1)).json()
    assert capped.entered.acquire(timeout=30)
    big = c.post("/v1/jobs", json=body(n=3, seed=5)).json()
    small = c.post("/v1/jobs", json=body(seed=9)).json()
    capped.gate.set()
    assert all(wait_status(c, j["id"])["status"] == "succeeded" for j in [first, big, small])
    assert [sum(r.num_images for r in call) for call in capped.calls] == [1, 3, 1]


def test_an_engine_without_batch_limit_is_capped_by_max_batch(make_client, engine, wait_status):
    """Ray's RemoteEngine has no batch_limit (its replicas plan their own batches): max_batch alone applies."""

    class NoLimit(GatedEngine):
        def __getattr__(self, name):
            if name == "batch_limit":
                raise AttributeError(name)
            return super().__getattr__(name)

    plain = NoLimit(engine)
    c = make_client(engine_=plain, max_batch=3)
    plain.gate.clear()
    first = c.post("/v1/jobs", json=body(seed=1)).json()
    assert plain.entered.acquire(timeout=30)
    jobs = [c.post("/v1/jobs", json=body(seed=10 + i)).json() for i in range(4)]
    plain.gate.set()
    assert all(wait_status(c, j["id"])["status"] == "succeeded" for j in [first, *jobs])
    assert [sum(r.num_images for r in call) for call in plain.calls] == [1, 3, 1]
