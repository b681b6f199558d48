"""RemoteEngine against a stand-in deployment handle (no Ray cluster): replica deaths before and during a run,
engine errors, cancellation; and the server app on it: what a client sees when no replica can run its job."""

import threading
import time

import pytest

pytest.importorskip("ray.serve")

from ray.exceptions import ActorDiedError, ActorUnavailableError  # noqa: E402

from zimage.deploy import remote_engine  # noqa: E402
from zimage.deploy.remote_engine import EngineUnavailable, RemoteEngine  # noqa: E402
from zimage.errors import NonFiniteOutputError  # noqa: E402
from zimage.request import GenerateRequest  # noqa: E402

REQ = GenerateRequest(prompts=("x",), width=256, height=256, steps=2, seed=1)
STARTED = ("started", {"pid": 1})
PROGRESS = ("progress", {"phase": "denoise", "step": 1, "total": 2, "latents": None})


class Stream:
    """A call's stream: yields its script's items, raises the exceptions in it; cancel() ends it like Serve."""

    def __init__(self, script, hold=None):
        self.script, self.hold, self.cancelled = script, hold, threading.Event()

    def __iter__(self):
        from ray.serve.exceptions import RequestCancelledError

        for item in self.script:
            if self.hold is not None:  # a call waiting for a replica: nothing arrives until cancelled
                self.cancelled.wait(10)
            if self.cancelled.is_set():
                raise RequestCancelledError("r")
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self):
        self.cancelled.set()


class Handle:
    """Each generate call plays the next script."""

    def __init__(self, *scripts, hold=None, info=None):
        self.scripts, self.hold, self.streams = list(scripts), hold, []
        self.info = info or {"model": "stand-in", "speed": "eager", "pid": 9}
        outer = self

        class Method:
            def remote(self, request):
                outer.streams.append(Stream(outer.scripts.pop(0), outer.hold))
                return outer.streams[-1]

        class Describe:
            def remote(self):
                class Answer:
                    def result(self, timeout_s=None):
                        return dict(outer.info)
                return Answer()

        self.generate, self.describe = Method(), Describe()

    def options(self, **kw):
        return self


def result_marker():
    return ("result", "the result")


def test_a_replica_dying_mid_run_is_run_once_more():
    engine = RemoteEngine(Handle([STARTED, PROGRESS, ActorDiedError()], [STARTED, PROGRESS, result_marker()]))
    seen = []
    assert engine.generate_many([REQ], seen.append) == ["the result"]
    assert engine.reruns == 1 and [p.step for p in seen] == [1, 1]  # progress starts over


def test_dying_twice_mid_run_is_engine_unavailable():
    engine = RemoteEngine(Handle([STARTED, ActorDiedError()], [STARTED, ActorDiedError()], [result_marker()]))
    with pytest.raises(EngineUnavailable, match="died twice"):
        engine.generate_many([REQ])


def test_failures_before_the_run_began_are_sent_again_without_counting(monkeypatch):
    monkeypatch.setattr(remote_engine.time, "sleep", lambda s: None)
    unavailable = ActorUnavailableError("gone", None)
    engine = RemoteEngine(Handle([ActorDiedError()], [unavailable], [STARTED, ActorDiedError()],
                                 [STARTED, result_marker()]))
    assert engine.generate_many([REQ]) == ["the result"] and engine.reruns == 1


def test_no_replica_reachable_for_long_is_engine_unavailable(monkeypatch):
    clock = iter(range(0, 10_000, 20))
    monkeypatch.setattr(remote_engine.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(remote_engine.time, "sleep", lambda s: None)
    engine = RemoteEngine(Handle(*[[ActorDiedError()]] * 10))
    with pytest.raises(EngineUnavailable, match="no engine replica reachable"):
        engine.generate_many([REQ])


def test_an_engine_error_is_raised_as_sent():
    engine = RemoteEngine(Handle([STARTED, ("error", NonFiniteOutputError("NaN latents"))]))
    with pytest.raises(NonFiniteOutputError, match="NaN latents"):
        engine.generate_many([REQ])


def test_a_cancelled_job_cancels_its_call_even_while_it_waits_for_a_replica():
    handle = Handle([STARTED, result_marker()], hold=True)
    engine = RemoteEngine(handle)
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    assert engine.generate_many([REQ], None, [cancel]) == [None]
    assert handle.streams[0].cancelled.is_set() and time.monotonic() - t0 < 5


def test_several_requests_run_side_by_side():
    engine = RemoteEngine(Handle([STARTED, ("result", "a")], [STARTED, ("result", "b")]))
    assert sorted(engine.generate_many([REQ, REQ])) == ["a", "b"]


# ---------------------------------------------------------------- the server app on a RemoteEngine
@pytest.fixture
def app_on(tmp_path):
    from fastapi.testclient import TestClient

    from zimage.server.app import create_app
    from zimage.server.settings import ServerSettings

    opened = []

    def make(handle):
        settings = ServerSettings(data_dir=tmp_path / "data", warmup_size=None, default_size=(256, 256),
                                  default_steps=2, max_batch=1, concurrent_batches=4)
        client = TestClient(create_app(settings, engine_loader=RemoteEngine(handle).wait_ready),
                            raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        return client

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def test_health_and_models_describe_the_replicas_engine(app_on):
    client = app_on(Handle())
    assert client.get("/health").json()["status"] == "ok"
    status = client.get("/v1/status").json()  # the engine's description is for authenticated callers
    assert status["engine"]["backend"] == "ray" and "pid" not in status["engine"]
    assert client.get("/v1/models").json()["data"][0]["id"] == "stand-in"


def test_a_sync_request_whose_replicas_keep_dying_is_a_clean_503(app_on, monkeypatch):
    client = app_on(Handle([STARTED, ActorDiedError()], [STARTED, ActorDiedError()]))
    r = client.post("/v1/images/generations", json={"prompt": "a fox"})
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "engine_unavailable" and "died twice" in error["message"]
    assert "Traceback" not in r.text and "ray" not in error["message"].lower()
    job = client.get("/v1/jobs").json()["data"][0]
    assert job["status"] == "failed" and job["error"]["code"] == "engine_unavailable"


def test_a_sync_request_survives_one_dying_replica(app_on, engine):
    result = engine.generate(REQ)
    client = app_on(Handle([STARTED, PROGRESS, ActorDiedError()], [STARTED, PROGRESS, ("result", result)]))
    r = client.post("/v1/images/generations", json={"prompt": "x", "seed": 1, "size": "256x256"})
    assert r.status_code == 200 and r.json()["data"][0]["seed"] == 1


def test_a_request_with_loras_names_its_set_for_serves_multiplexed_routing():
    from zimage.deploy.remote_engine import lora_set_id

    handle = Handle([STARTED, result_marker()], [STARTED, result_marker()])
    tags = []
    handle.options = lambda **kw: tags.append(kw.get("multiplexed_model_id")) or handle
    engine = RemoteEngine(handle)
    tags.clear()  # (RemoteEngine's own options(stream=True))
    engine.generate_many([REQ])
    with_loras = GenerateRequest(prompts=("x",), width=256, height=256, steps=2, seed=1,
                                 loras=(("style", 0.8), ("detail", 1.0)))
    engine.generate_many([with_loras])
    same_set = lora_set_id(GenerateRequest(prompts=("y",), loras=(("detail", 1.0), ("style", 0.8))).loras)
    assert tags == [same_set]  # no tag without LoRAs; the set in any order is one id
