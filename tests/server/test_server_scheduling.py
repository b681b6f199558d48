"""The worker: dynamic batching (and that it changes no image), cancellation, the bounded queue."""

import io

import numpy as np
from PIL import Image

from zimage.request import GenerateRequest

SIZE = 256


def body(**kw):
    return {"prompt": "a lighthouse", "size": f"{SIZE}x{SIZE}", "num_inference_steps": 2, **kw}


def hold_first_call(client, gated):
    """Submit a job and stop the engine at its gate, so that the next jobs queue up behind it."""
    gated.gate.clear()
    first = client.post("/v1/jobs", json=body(seed=1)).json()
    assert gated.entered.acquire(timeout=30)
    return first


def test_queued_compatible_jobs_run_as_one_batch_with_solo_pixels(make_client, gated, engine, wait_status):
    c = make_client(engine_=gated, max_batch=8)
    first = hold_first_call(c, gated)
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    jobs = [c.post("/v1/jobs", json=body(prompt=p, seed=100 + i)).json() for i, p in enumerate(prompts)]
    other = c.post("/v1/jobs", json=body(size="256x512", seed=9)).json()  # another size: not batchable with them
    assert [j["position"] for j in jobs + [other]] == [0, 1, 2, 3]
    gated.gate.set()
    done = [wait_status(c, j["id"]) for j in [first, *jobs, other]]
    assert all(d["status"] == "succeeded" for d in done)
    # engine calls: the held one, then the three compatible jobs together, then the odd size alone
    assert [[r.prompts[0] for r in call] for call in gated.calls] == [["a lighthouse"], prompts, ["a lighthouse"]]
    assert "zimage_batch_images_count 3.0" in c.get("/metrics").text
    # each batched image equals the same request run alone (float rounding aside: at most 1/255, few pixels)
    for p, d in zip(prompts, done[1:4]):
        served = np.asarray(Image.open(io.BytesIO(c.get(d["images"][0]["url"]).content)), dtype=np.int16)
        solo = engine.generate(GenerateRequest(prompts=(p,), width=SIZE, height=SIZE, steps=2,
                                               seed=d["params"]["seed"]))
        alone = np.asarray(solo.images[0].image, dtype=np.int16)
        diff = np.abs(served - alone)
        assert diff.max() <= 1, diff.max()
        assert (diff > 0).mean() < 0.01, (diff > 0).mean()


def test_batch_respects_max_batch_images(make_client, gated, wait_status):
    c = make_client(engine_=gated, max_batch=4)
    first = hold_first_call(c, gated)
    jobs = [c.post("/v1/jobs", json=body(n=2, seed=10 * i)).json() for i in range(3)]  # 6 images
    gated.gate.set()
    for j in [first, *jobs]:
        assert wait_status(c, j["id"])["status"] == "succeeded"
    assert [sum(r.num_images for r in call) for call in gated.calls] == [1, 4, 2]


def test_cancel_queued_job_never_runs(make_client, gated, wait_status):
    c = make_client(engine_=gated)
    first = hold_first_call(c, gated)
    queued = c.post("/v1/jobs", json=body(prompt="never")).json()
    r = c.delete(f"/v1/jobs/{queued['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert c.delete(f"/v1/jobs/{queued['id']}").status_code == 200  # idempotent
    gated.gate.set()
    assert wait_status(c, first["id"])["status"] == "succeeded"
    assert c.get(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
    assert all("never" not in r.prompts for call in gated.calls for r in call)
    assert c.delete(f"/v1/jobs/{first['id']}").status_code == 409  # finished: nothing to cancel


def test_cancel_running_job_stops_and_leaves_its_batch(make_client, gated, wait_status):
    c = make_client(engine_=gated)
    first = hold_first_call(c, gated)  # running, held before its first step
    assert c.get(f"/v1/jobs/{first['id']}").json()["status"] == "running"
    assert c.delete(f"/v1/jobs/{first['id']}").json()["status"] == "cancelled"
    gated.gate.set()
    after = c.post("/v1/jobs", json=body()).json()
    assert wait_status(c, after["id"])["status"] == "succeeded"  # the worker carries on
    job = c.get(f"/v1/jobs/{first['id']}").json()
    assert job["status"] == "cancelled" and job["images"] == []
    assert 'zimage_jobs_total{status="cancelled"} 1.0' in c.get("/metrics").text


def test_cancel_one_job_of_a_running_batch(make_client, gated, wait_status):
    c = make_client(engine_=gated)
    hold_first_call(c, gated)
    a = c.post("/v1/jobs", json=body(prompt="keep", seed=3)).json()
    b = c.post("/v1/jobs", json=body(prompt="drop", seed=4)).json()
    gated.gate.set()
    assert gated.entered.acquire(timeout=30)  # the batch [a, b] reached the engine
    c.delete(f"/v1/jobs/{b['id']}")
    assert wait_status(c, a["id"])["status"] == "succeeded"
    assert c.get(f"/v1/jobs/{b['id']}").json()["status"] == "cancelled"


def test_full_queue_answers_429_with_retry_after(make_client, gated, wait_status):
    c = make_client(engine_=gated, max_queue=2)
    first = hold_first_call(c, gated)
    ok = [c.post("/v1/jobs", json=body()) for _ in range(2)]
    assert all(r.status_code == 202 for r in ok)
    r = c.post("/v1/jobs", json=body())
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
    r = c.post("/v1/images/generations", json=body())
    assert r.status_code == 429
    gated.gate.set()
    for j in [first] + [x.json() for x in ok]:
        assert wait_status(c, j["id"])["status"] == "succeeded"
    assert c.post("/v1/jobs", json=body()).status_code == 202  # room again


def test_failed_batch_isolates_the_bad_job(make_client, gated, wait_status):
    c = make_client(engine_=gated)
    first = hold_first_call(c, gated)
    good = c.post("/v1/jobs", json=body(prompt="fine")).json()
    bad = c.post("/v1/jobs", json=body(prompt="boom")).json()
    gated.fail_prompts.add("boom")
    gated.gate.set()
    assert wait_status(c, first["id"])["status"] == "succeeded"
    assert wait_status(c, good["id"])["status"] == "succeeded"
    failed = wait_status(c, bad["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "runtime_error"


def test_compiled_engine_is_warmed_at_batch_one_and_two_and_through_the_mixed_lora_path():
    """Compiled graphs specialise on batch size 1; warming a batch of 2 as well compiles the batch-dynamic graph
    that later batches reuse, so the first batches under load do not stall on compilation (seen on an H200). With
    runtime LoRA slots a batch mixing sets has a graph of its own: the batch of 2 runs once more through it."""
    from types import SimpleNamespace

    from zimage.engine.engine import Engine
    from zimage.engine.loras import RuntimeSlots
    from zimage.models.lora import LoraRows
    from zimage.server.worker import Worker

    calls = []
    rows = LoraRows()
    runtime = RuntimeSlots(None, [], rows, slots=4, rank=8)
    engine = SimpleNamespace(speed="compile", loras=SimpleNamespace(runtime=None), config=SimpleNamespace(lora_slots=0),
                             generate=lambda req, *a, **k: calls.append((req.num_images, req.width, rows.force_mixed)))
    engine.warm_up = lambda *a: Engine.warm_up(engine, *a)
    cases = (("compile", 8, None, [(1, 256, False), (2, 256, False)]), ("compile", 1, None, [(1, 256, False)]),
             ("eager", 8, None, [(1, 256, False)]),  # eager has nothing to specialise
             ("compile", 8, runtime, [(1, 256, False), (2, 256, False), (2, 256, True)]),
             ("compile", 1, runtime, [(1, 256, False)]))
    for speed, max_batch, slots, want in cases:
        calls.clear()
        engine.speed, engine.loras.runtime, engine.config.lora_slots = speed, slots, 4 if slots else 0
        worker = Worker.__new__(Worker)  # only the warm-up is exercised
        worker.engine = engine
        worker.settings = SimpleNamespace(warmup_size=(256, 256), warmup_steps=2, max_batch=max_batch)
        worker._warm_up()
        assert calls == want, (speed, max_batch, slots)
        assert not rows.force_mixed


def test_gpu_worker_starts_next_batch_while_images_are_encoded(make_client, gated, wait_status, monkeypatch):
    """Encoding and storing images happens off the worker thread: a slow encoder must not hold the engine."""
    import threading

    import zimage.server.images as images

    release = threading.Event()
    real_encode = images.encode_image

    def slow_encode(*args, **kwargs):
        assert release.wait(60), "test never released the encoder"
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(images, "encode_image", slow_encode)
    c = make_client(engine_=gated, max_batch=1)
    first = c.post("/v1/jobs", json=body(seed=1)).json()
    second = c.post("/v1/jobs", json=body(prompt="a second job", seed=2)).json()
    assert gated.entered.acquire(timeout=30) and gated.entered.acquire(timeout=30)  # both engine calls began
    assert c.get(f"/v1/jobs/{first['id']}").json()["status"] == "running"  # its image is not written yet
    release.set()
    assert wait_status(c, first["id"])["status"] == "succeeded"
    assert wait_status(c, second["id"])["status"] == "succeeded"
