"""zimage on Ray Serve, for real: a local Ray cluster, two engine replicas of the tiny model (one torch thread
each), the official openai client and plain HTTP against the ingress; replicas killed mid-batch (ray.kill, and
kill -9 of the process) and the ingress killed: what clients see, and that every job finishes, once. Both job
store backends (see conftest)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from urllib.parse import urljoin

import httpx
import pytest

from tests.deploy.conftest import STEPS, wait_healthy

pytestmark = pytest.mark.slow
SLOW = 100  # steps (the API's most) at SLOW_SIZE: several seconds a job on one thread, so that the four jobs run
SLOW_SIZE = "512x512"  # at once for a while (at 256x256 a loaded machine finished some before the last one began)


# ---------------------------------------------------------------- helpers
def wait_job(url, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job['status']}")


def events(url, job_id, into: list, timeout=300.0):
    """Read a job's SSE stream to its end into `into`: (event, data) pairs."""
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=timeout) as r:
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                into.append((event, json.loads(line[6:])))


def engine_actor_names():
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "ZImageEngine" in a["name"])


def running_engine_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("zimage")
    if app is None or "ZImageEngine" not in app.deployments:
        return 0
    return app.deployments["ZImageEngine"].replica_states.get("RUNNING", 0)


def wait_replicas(n=2, timeout=240.0):
    deadline = time.monotonic() + timeout
    while running_engine_replicas() != n:
        assert time.monotonic() < deadline, f"Serve did not bring the engine back to {n} replicas"
        time.sleep(0.5)


def replica_pids(deployed) -> set[int]:
    handle = deployed.engine_handle()
    pids: set[int] = set()
    deadline = time.monotonic() + 60
    while len(pids) < 2:
        assert time.monotonic() < deadline, "could not reach both replicas"
        pids.add(handle.pid.remote().result(timeout_s=30))
    return pids


def submit_slow(url, i):
    r = httpx.post(f"{url}/v1/jobs", json={"prompt": f"slow {i}", "seed": 100 + i, "num_inference_steps": SLOW,
                                          "size": SLOW_SIZE}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def all_running(url, ids, min_step=3):
    jobs = [httpx.get(f"{url}/v1/jobs/{i}", timeout=10).json() for i in ids]
    return all(j["status"] == "running" and (j["progress"] or {}).get("step", 0) >= min_step
               and j["progress"]["phase"] == "denoise" for j in jobs)


def kill_mid_batch(deployed, kill, attempts=3):
    """Four slow jobs, two on each replica (max_ongoing_requests=2) running as one batch (batch_wait), one of them
    a synchronous openai call; once all run, `kill()`. Returns (job ids, their event streams, the sync response or
    its error). On a loaded machine the four do not always overlap (a replica may start its first job alone and
    the second after it): then that round is let finish and another is sent, up to `attempts`; only a round whose
    four jobs all ran at once is killed and checked."""
    for attempt in range(attempts):
        round_ = start_four(deployed.url, attempt)
        if round_.wait_all_running(timeout=90):
            break
        round_.finish()  # the precondition was not met: nothing was killed, nothing to check
    else:
        pytest.fail(f"in {attempts} rounds the four jobs never ran at once")
    kill()
    assert httpx.get(deployed.url + "/health", timeout=10).status_code == 200  # the ingress stays up
    round_.finish()
    return round_.ids + round_.sync_ids, round_.streams, round_.sync


class Round:
    def __init__(self, url, ids, streams, sync, threads, sync_prompt):
        self.url, self.ids, self.streams, self.sync, self.threads = url, ids, streams, sync, threads
        self.sync_prompt, self.sync_ids = sync_prompt, []

    def wait_all_running(self, timeout) -> bool:
        """True once the four run at once; False when one finished first (this round cannot overlap any more)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = httpx.get(f"{self.url}/v1/jobs?limit=20").json()["data"]
            self.sync_ids = [j["id"] for j in listed if j["params"]["prompt"] == self.sync_prompt][:1]
            jobs = [httpx.get(f"{self.url}/v1/jobs/{i}", timeout=10).json() for i in self.ids + self.sync_ids]
            if any(j["status"] in ("succeeded", "failed", "cancelled") for j in jobs):
                return False
            if self.sync_ids and all_running(self.url, self.ids + self.sync_ids):
                return True
            time.sleep(0.05)
        return False

    def finish(self):
        for t in self.threads:
            t.join(300)


def start_four(url, attempt) -> Round:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    sync: dict = {}
    sync_prompt = f"sync {attempt}"

    def sync_call():
        try:
            sync["response"] = client.images.generate(prompt=sync_prompt, size=SLOW_SIZE, response_format="b64_json",
                                                      extra_body={"seed": 7, "num_inference_steps": SLOW})
        except Exception as e:  # noqa: BLE001 - examined by the test
            sync["error"] = e

    caller = threading.Thread(target=sync_call, daemon=True)
    caller.start()
    ids = [submit_slow(url, 10 * attempt + i) for i in range(3)]  # within the replicas' batch_wait: two batches of two
    streams = {i: [] for i in ids}
    readers = [threading.Thread(target=events, args=(url, i, streams[i]), daemon=True) for i in ids]
    for t in readers:
        t.start()
    return Round(url, ids, streams, sync, readers + [caller], sync_prompt)


def check_every_job_finished_once(deployed, ids, streams, sync):
    url = deployed.url
    assert "error" not in sync, f"the synchronous call failed: {sync.get('error')!r}"
    [image] = sync["response"].data
    assert image.seed == 7 and base64.b64decode(image.b64_json).startswith(b"\x89PNG")
    for job_id in ids:
        job = wait_job(url, job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 1 and len(job["images"]) == 1, job
    restarted = 0
    for job_id, stream in streams.items():
        assert stream[-1][0] == "succeeded" and [e for e, _ in stream].count("succeeded") == 1
        # The run began again: its progress goes back (to the prompt's encoding: a replica sends the first
        # denoising steps only now and then, so the step number alone may not fall).
        order = {"encode": 0, "encode_image": 1, "denoise": 2, "decode": 3}
        marks = [(order[d["phase"]], d["step"]) for e, d in stream if e == "progress"]
        restarted += any(b < a for a, b in zip(marks, marks[1:]))
    # Two of the four ran on the killed replica: at least one of the three streamed ones.
    assert restarted >= 1
    files = sorted(p.name for p in (deployed.data_dir / "images").iterdir())
    assert not [f for f in files if f.endswith(".part")]
    for job_id in ids:
        assert [f for f in files if f.startswith(job_id)] == [f"{job_id}-0.png"]


# ---------------------------------------------------------------- the API through the ingress
def test_openai_client_jobs_and_events_through_the_ingress(deployed):
    from openai import OpenAI
    from PIL import Image

    url = deployed.url
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.images.generate(prompt="a red fox", size="256x256", n=2, response_format="b64_json",
                               extra_body={"seed": 3, "num_inference_steps": STEPS})
    assert [d.seed for d in r.data] == [3, 4]
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (256, 256)
    r = client.images.generate(prompt="a red fox", size="256x256", response_format="url",
                               extra_body={"seed": 3, "num_inference_steps": STEPS})
    image = httpx.get(urljoin(url + "/", r.data[0].url))
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert [m.id for m in client.models.list()] == ["tiny-random"]

    job = httpx.post(f"{url}/v1/jobs", json={"prompt": "a lighthouse", "num_inference_steps": 8}).json()
    seen: list = []
    events(url, job["id"], seen)
    names = [e for e, _ in seen]
    assert names[-1] == "succeeded" and "progress" in names and seen[-1][1]["job"]["status"] == "succeeded"

    slow = submit_slow(url, 99)
    wait_job(url, slow, ("running",))
    assert httpx.delete(f"{url}/v1/jobs/{slow}").json()["status"] == "cancelled"
    assert wait_job(url, slow)["status"] == "cancelled"
    assert httpx.delete(f"{url}/v1/jobs/{slow}").status_code in (200, 409)


def test_an_image_edit_runs_through_the_ingress_as_on_one_machine(deployed, engine, tmp_path):
    """OpenAI's images.edit (multipart picture and alpha mask) through the ingress: the picture travels with the
    request to a replica and the job records its hashes; the image is the local engine's, to float noise across
    processes."""
    import numpy as np
    from openai import OpenAI

    from tests.server.pictures import alpha_mask, bw_mask, picture, pixels
    from zimage.request import GenerateRequest

    (tmp_path / "photo.png").write_bytes(picture())
    (tmp_path / "alpha.png").write_bytes(alpha_mask())
    client = OpenAI(base_url=deployed.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with open(tmp_path / "photo.png", "rb") as image, open(tmp_path / "alpha.png", "rb") as mask:
        r = client.images.edit(image=image, mask=mask, prompt="a red fox", size="256x256", response_format="b64_json",
                               extra_body={"seed": 5, "num_inference_steps": STEPS, "strength": 0.8})
    served = pixels(base64.b64decode(r.data[0].b64_json))
    (tmp_path / "mask.png").write_bytes(bw_mask())
    want = engine.generate(GenerateRequest(prompts=("a red fox",), image=tmp_path / "photo.png",
                                           mask=tmp_path / "mask.png", strength=0.8, steps=STEPS, guidance=0.0,
                                           seed=5)).images[0].image
    assert np.abs(served - np.asarray(want, dtype=np.int16)).max() <= 2
    [job] = httpx.get(deployed.url + "/v1/jobs?limit=1").json()["data"]
    assert job["params"]["image_sha256"] and job["params"]["mask_sha256"] and job["params"]["strength"] == 0.8


def test_the_same_routes_and_error_bodies_as_zimage_serve(deployed, engine):
    from fastapi.testclient import TestClient

    from zimage.server.app import create_app
    from zimage.server.settings import ServerSettings

    settings = ServerSettings(data_dir=deployed.data_dir / "local", warmup_size=None)
    with TestClient(create_app(settings, engine=engine)) as local:
        compare_with(deployed, local)


def compare_with(deployed, local):
    assert httpx.get(deployed.url + "/openapi.json").json() == local.get("/openapi.json").json()
    for method, path, body in [("POST", "/v1/images/generations", {"prompt": "x", "size": "100x100"}),
                               ("POST", "/v1/jobs", {"prompt": "x", "colour": "red"}),
                               ("POST", "/v1/jobs", None),
                               ("GET", "/v1/jobs/job_" + "0" * 24, None),
                               ("GET", "/v1/images/nope.png", None),
                               ("GET", "/no/such/route", None)]:
        remote = httpx.request(method, deployed.url + path, json=body)
        here = local.request(method, path, json=body)
        assert (remote.status_code, remote.json()) == (here.status_code, here.json()), path


# ---------------------------------------------------------------- faults
@pytest.mark.parametrize("deployed", ["sqlite"], indirect=True)
def test_a_replica_killed_by_ray_mid_batch(deployed):
    """ray.kill of one engine replica while it runs two jobs: the synchronous call and the jobs are run again on
    a replica that lives and succeed once; Serve starts a new replica; the ingress never goes down."""
    import ray

    wait_replicas(2)
    victim = engine_actor_names()[0]
    ids, streams, sync = kill_mid_batch(
        deployed, lambda: ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True))
    check_every_job_finished_once(deployed, ids, streams, sync)
    wait_replicas(2)


@pytest.mark.parametrize("deployed", ["postgres"], indirect=True)
def test_a_replica_killed_9_mid_batch(deployed):
    """kill -9 of one engine replica's process: the same outcome as ray.kill."""
    wait_replicas(2)
    victim = min(replica_pids(deployed))
    ids, streams, sync = kill_mid_batch(deployed, lambda: os.kill(victim, signal.SIGKILL))
    check_every_job_finished_once(deployed, ids, streams, sync)
    wait_replicas(2)
    assert victim not in replica_pids(deployed)


@pytest.mark.parametrize("deployed", ["postgres"], indirect=True)
def test_the_ingress_killed_mid_run_jobs_continue_after_its_restart(deployed):
    """The ingress (which holds the queue) killed while jobs run and wait: Serve starts another, which recovers
    them from the store; every accepted job succeeds, once."""
    import ray

    url = deployed.url
    wait_replicas(2)
    ids = [submit_slow(url, 10 + i) for i in range(6)]  # four run, two wait
    deadline = time.monotonic() + 240
    while not all_running(url, ids[:4], min_step=2):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [ingress] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "ZImageIngress" in a["name"]]
    ray.kill(ray.get_actor(ingress, namespace="serve"), no_restart=True)
    wait_healthy(url)
    for job_id in ids:
        job = wait_job(url, job_id, timeout=300)
        assert job["status"] == "succeeded" and len(job["images"]) == 1, job
    assert [wait_job(url, j)["attempts"] for j in ids[:4]] == [2] * 4  # interrupted once, run again
