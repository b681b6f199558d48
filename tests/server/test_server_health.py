"""Health says what is true and only what the public may know; when no job can run, work is refused with 503
and nobody waits forever (a failed load, a worker thread that died outside a job)."""

import threading
import time

KEY = "health-test-key"
BODY = {"prompt": "a health check", "size": "256x256", "num_inference_steps": 1}


def wait_health(client, status, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/health")
        if r.json()["status"] == status:
            return r
        time.sleep(0.01)
    raise TimeoutError(f"/health never said {status}: {r.json()}")


def test_public_health_carries_no_path_or_error_text(make_client, engine):
    c = make_client(api_key=KEY)
    r = c.get("/health")
    assert r.status_code == 200 and set(r.json()) == {"status", "detail", "queue", "running"}
    assert str(engine.location.path) not in r.text
    assert c.get("/v1/status").status_code == 401  # the engine's description needs the key
    full = c.get("/v1/status", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert full["status"] == "ok" and full["engine"]["path"] == str(engine.location.path) and full["version"]


def test_failed_load_refuses_work_with_503_and_keeps_the_cause_private(make_client):
    release = threading.Event()

    def broken():
        release.wait(30)
        raise RuntimeError("no weights at /secret/path/model")

    c = make_client(ready=False, loader=broken)
    accepted = c.post("/v1/jobs", json=BODY)  # accepted while loading
    assert accepted.status_code == 202
    waiting = {}
    sync = threading.Thread(target=lambda: waiting.update(r=c.post("/v1/images/generations", json=BODY)))
    sync.start()
    time.sleep(0.3)  # the synchronous request is waiting on its job
    release.set()
    r = wait_health(c, "failed")
    assert r.status_code == 503 and "/secret/path" not in r.text and "RuntimeError" not in r.text
    assert r.json()["detail"] == "the model could not be loaded (see the server log)"
    sync.join(10)
    assert not sync.is_alive(), "the synchronous request still hangs"
    assert waiting["r"].status_code == 503 and waiting["r"].json()["error"]["code"] == "engine_unavailable"
    for path in ("/v1/jobs", "/v1/images/generations"):
        r = c.post(path, json=BODY)
        assert r.status_code == 503, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "engine_unavailable" and "could not be loaded" in err["message"]
        assert err["type"] == "service_unavailable_error"
    assert "no weights at /secret/path/model" in c.get("/v1/status").json()["error"]  # for the operator
    # the job accepted during loading stays queued for the next start; its event stream ends instead of idling
    job = c.get(f"/v1/jobs/{accepted.json()['id']}").json()
    assert job["status"] == "queued"
    with c.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        text = "".join(s.iter_text())
    assert "event: error\n" in text and "engine_unavailable" in text


def test_worker_that_dies_outside_a_job_makes_health_failed(make_client, gated, wait_status):
    c = make_client(engine_=gated)
    store = c.app.state.zimage.store

    def broken_start(job_ids):
        raise OSError("disk I/O error")

    store.start = broken_start  # the store fails between jobs: the worker thread dies
    c.post("/v1/jobs", json=BODY)
    r = wait_health(c, "failed")
    assert r.status_code == 503 and "disk" not in r.text
    assert r.json()["detail"] == "the job worker stopped after an error (see the server log)"
    t0 = time.monotonic()
    r = c.post("/v1/images/generations", json=BODY)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert time.monotonic() - t0 < 5
    assert "OSError: disk I/O error" in c.get("/v1/status").json()["error"]


def test_worker_thread_gone_without_a_word_is_failed(make_client):
    """A thread that ends without reaching the handler (e.g. a BaseException) still shows as failed."""
    c = make_client()
    worker = c.app.state.zimage.worker
    with worker._cv:
        worker._stopping = True  # let the thread end as at shutdown ...
        worker._cv.notify_all()
    worker._thread.join(10)
    worker._stopping = False  # ... but the server is not stopping
    r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert c.post("/v1/jobs", json=BODY).status_code == 503
