"""create_app(settings, engine=None): the FastAPI application.

The lifespan opens the job store, recovers jobs a crash left behind, and starts the worker thread, which loads
and warms the engine (so the server answers /health with 503 "loading" at once, and 200 only when warm). Jobs
submitted meanwhile are accepted and queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from zimage.server.errors import ApiError, error_body, install_error_handlers
from zimage.server.settings import ServerSettings

log = logging.getLogger("zimage.server")
STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a JSON request is a few KiB even with the longest allowed prompts


@dataclass
class ServerState:
    settings: ServerSettings
    store: object  # jobs.JobStore
    hub: object  # events.EventHub
    metrics: object  # metrics.Metrics
    worker: object  # worker.Worker


def default_loader(settings: ServerSettings):
    def load():
        from zimage.engine.config import EngineConfig
        from zimage.engine.engine import Engine

        return Engine.load(EngineConfig(model=settings.model, device=settings.device, dtype=settings.dtype,
                                        speed=settings.speed, vram_budget_gib=settings.vram_budget_gib,
                                        fp8=settings.fp8, converted_cache=settings.converted_cache))

    return load


def create_app(settings: ServerSettings | None = None, engine=None, engine_loader=None):
    """`engine`: an already loaded Engine (tests share one); else `engine_loader()` or the settings' model."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    from zimage.server.auth import make_key_check
    from zimage.server.events import EventHub
    from zimage.server.jobs import JobStore
    from zimage.server.metrics import Metrics
    from zimage.server.routes import build_router, build_public_router
    from zimage.server.worker import Worker
    from zimage.version import __version__

    settings = settings or ServerSettings()
    loader = (lambda: engine) if engine is not None else (engine_loader or default_loader(settings))

    @asynccontextmanager
    async def lifespan(app):
        store = JobStore.from_settings(settings)
        hub = EventHub()
        hub.bind(asyncio.get_running_loop())
        metrics = Metrics(lambda: state.worker.engine)
        state = ServerState(settings, store, hub, metrics, Worker(store, hub, metrics, settings, loader))
        app.state.zimage = state
        state.worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.worker.stop)
            store.close()

    app = FastAPI(
        title="zimage server", version=__version__, lifespan=lifespan,
        description="Z-Image-Turbo text-to-image: OpenAI-compatible images API, async jobs with progress events. "
                    "Errors are `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.",
    )
    install_error_handlers(app)

    app.add_middleware(LimitsAndMetrics)

    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key"])

    app.include_router(build_public_router())
    app.include_router(build_router(), dependencies=[_depends(make_key_check(settings.api_key))])
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


class LimitsAndMetrics:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the routes): rejects bodies
    over MAX_BODY_BYTES by their Content-Length (413) and times each request into the metrics."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            response = JSONResponse(error_body(413, f"request body over {MAX_BODY_BYTES} bytes", "body_too_large"),
                                    413)
            return await response(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = getattr(scope["app"].state, "zimage", None) if "app" in scope else None
            route = getattr(scope.get("route"), "path", "unmatched")
            if state is not None:
                state.metrics.http.labels(route, str(status[0])).observe(time.perf_counter() - t0)


def _depends(fn):
    from fastapi import Depends

    return Depends(fn)


def get_state(request) -> ServerState:
    state = getattr(request.app.state, "zimage", None)
    if state is None:  # only if used without its lifespan (e.g. TestClient not entered as a context manager)
        raise ApiError(503, "the server is starting", "starting")
    return state
