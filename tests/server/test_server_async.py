"""The routes' waiting and blocking: timeouts caught as asyncio raises them, blocking work off the event loop."""

import asyncio
import threading
import types

import zimage.server.routes as routes

BODY = {"prompt": "an async fox", "size": "256x256", "num_inference_steps": 1}


class Py310Asyncio(types.ModuleType):
    """asyncio as on Python 3.10, where asyncio.wait_for raises asyncio.TimeoutError, a class of its own that
    `except TimeoutError` does not catch (3.11 made them one class, so this cannot be seen on 3.11 otherwise)."""

    class TimeoutError(Exception):  # noqa: A001 - the point of the stand-in
        pass

    def __init__(self):
        super().__init__("asyncio")
        self.timeouts = 0

    def __getattr__(self, name):
        return getattr(asyncio, name)

    async def wait_for(self, aw, timeout):
        try:
            return await asyncio.wait_for(aw, timeout)
        except asyncio.TimeoutError:
            self.timeouts += 1
            raise self.TimeoutError() from None


def test_waits_time_out_as_asyncio_raises_it(make_client, gated, monkeypatch):
    fake = Py310Asyncio()
    monkeypatch.setattr(routes, "asyncio", fake)
    monkeypatch.setattr(routes, "DISCONNECT_POLL_S", 0.02)
    monkeypatch.setattr(routes, "STREAM_POLL_S", 0.02)
    c = make_client(engine_=gated)
    gated.gate.clear()  # the job waits at the engine, so the waits below time out several times
    threading.Timer(0.5, gated.gate.set).start()
    r = c.post("/v1/images/generations", json=BODY)
    assert r.status_code == 200, r.text
    assert fake.timeouts >= 3
    gated.gate.clear()
    job = c.post("/v1/jobs", json=BODY).json()
    threading.Timer(0.5, gated.gate.set).start()
    before = fake.timeouts
    with c.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        text = "".join(s.iter_text())
    assert "event: succeeded" in text and fake.timeouts > before


def test_store_and_image_files_are_used_off_the_event_loop(make_client, monkeypatch, wait_status):
    """Every route that touches SQLite or an image file: each such call must run outside the event loop."""
    import pathlib

    on_loop = []

    def off_loop(name, fn, only=lambda *args: True):
        def checked(*args, **kwargs):
            try:
                if not only(*args):
                    raise RuntimeError("not a call of interest")
                asyncio.get_running_loop()
                on_loop.append(name)
            except RuntimeError:  # no loop in this thread: a worker thread
                pass
            return fn(*args, **kwargs)

        return checked

    c = make_client()
    store = c.app.state.zimage.store
    for name in ("add", "get", "list", "cancel", "image_path"):
        monkeypatch.setattr(store, name, off_loop(name, getattr(store, name)))
    images = store.images_dir.resolve()
    monkeypatch.setattr(pathlib.Path, "read_bytes", off_loop("read_bytes", pathlib.Path.read_bytes,
                                                             lambda path: path.resolve().parent == images))
    r = c.post("/v1/images/generations", json=BODY)  # submit, wait (polls), read the image for base64
    assert r.status_code == 200 and r.json()["data"][0]["b64_json"]
    job = c.post("/v1/jobs", json=BODY).json()
    done = wait_status(c, job["id"])
    assert c.get("/v1/jobs").status_code == 200
    assert c.get(done["images"][0]["url"]).status_code == 200
    with c.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
        assert "succeeded" in "".join(s.iter_text())
    assert c.delete(f"/v1/jobs/{job['id']}").status_code == 409
    assert on_loop == [], f"blocking calls on the event loop: {sorted(set(on_loop))}"
