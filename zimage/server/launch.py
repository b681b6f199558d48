"""Running the server: `serve(settings)` blocks (the CLI); `start_in_thread(...)` returns a handle (tests, the load
test): uvicorn on a loopback port in a background thread, stopped cleanly by `.stop()`."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from zimage.server.settings import ServerSettings


def serve(settings: ServerSettings, engine=None) -> None:
    import uvicorn

    from zimage.server.app import create_app
    from zimage.server.protocol import http_protocol

    _configure_logging(settings.log_level)
    app = create_app(settings, engine=engine)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False,
                timeout_graceful_shutdown=10, http=http_protocol())


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    server: object  # uvicorn.Server
    thread: threading.Thread
    app: object

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until /health says the engine is warm (raises if it failed or the time ran out)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"the server could not load its engine: {r.json().get('detail')}")
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.url} not ready after {timeout:.0f}s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_in_thread(settings: ServerSettings, engine=None, ready: bool = True) -> RunningServer:
    """Serve `settings` (port 0: a free one) from a thread of this process; waits for readiness by default."""
    import uvicorn

    from zimage.server.app import create_app
    from zimage.server.protocol import http_protocol

    if settings.port == 0:
        settings.port = free_port(settings.host)
    app = create_app(settings, engine=engine)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, http=http_protocol())
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="zimage-uvicorn", daemon=True)
    thread.start()
    handle = RunningServer(f"http://{settings.host}:{settings.port}", server, thread, app)
    if ready:
        handle.wait_ready()
    return handle


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
