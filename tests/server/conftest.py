"""Fixtures for the server tests: one tiny engine for the whole session, apps on temporary data dirs."""

import threading
import time

import pytest

from zimage.server.settings import ServerSettings

SIZE = 256  # the smallest allowed side: the tiny model makes a 256x256 image in ~0.15 s on CPU
STEPS = 2


@pytest.fixture(scope="session")
def engine():
    from zimage import Engine, EngineConfig

    return Engine.load(EngineConfig(model="tiny-random", device="cpu"))


class GatedEngine:
    """Wraps a real engine: records each generate_many call and can hold it at a gate, so a test can queue jobs
    behind a running one and know exactly which engine calls happened."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = []  # one list of GenerateRequest per engine call
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)  # released once per call, when it reaches the gate
        self.fail_prompts = set()  # a batch containing one of these prompts raises

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, request, on_progress=None, cancel=None):  # warm-up
        return self.engine.generate(request, on_progress, cancel)

    def generate_many(self, requests, on_progress=None, cancels=None):
        self.calls.append(list(requests))
        self.entered.release()
        assert self.gate.wait(60), "test gate never opened"
        if any(p in self.fail_prompts for r in requests for p in r.prompts):
            raise RuntimeError("simulated engine failure")
        return self.engine.generate_many(requests, on_progress, cancels)


def settings_for(tmp_path, **overrides) -> ServerSettings:
    base = dict(data_dir=tmp_path / "data", warmup_size=None, default_size=(SIZE, SIZE), default_steps=STEPS,
                port=0)
    base.update(overrides)
    return ServerSettings(**base)


def wait_ready(client, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.02)
    raise TimeoutError("server not ready")


def wait_status(client, job_id, statuses=("succeeded", "failed", "cancelled"), timeout=60.0, headers=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} still {job['status']}")


@pytest.fixture(name="wait_status")
def wait_status_fixture():
    return wait_status


@pytest.fixture
def make_client(tmp_path, engine):
    """make_client(engine=..., **settings) -> a started TestClient whose engine is warm."""
    from fastapi.testclient import TestClient

    from zimage.server.app import create_app

    opened = []

    def make(engine_=None, ready=True, loader=None, **overrides):
        app = create_app(settings_for(tmp_path, **overrides), engine=None if loader else (engine_ or engine),
                         engine_loader=loader)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        if ready:
            wait_ready(client)
        return client

    yield make
    for c in reversed(opened):
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def gated(engine):
    g = GatedEngine(engine)
    yield g
    g.gate.set()


@pytest.fixture
def make_live(tmp_path, engine):
    """make_live(engine=..., **settings) -> a started uvicorn server in a thread (real sockets), stopped after."""
    from zimage.server.launch import start_in_thread

    started = []

    def make(engine_=None, ready=True, **overrides):
        server = start_in_thread(settings_for(tmp_path, **overrides), engine=engine_ or engine, ready=ready)
        started.append(server)
        return server

    yield make
    for s in reversed(started):
        s.stop()
