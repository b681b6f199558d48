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

from zimage.server.errors import ApiError, install_error_handlers
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
    signer: object = None  # signing.UrlSigner when image URLs are signed (an API key and url_ttl_s > 0)


def default_loader(settings: ServerSettings):
    def load():
        from zimage.engine.engine import Engine

        return Engine.load(settings.engine)

    return load


def create_app(settings: ServerSettings | None = None, engine=None, engine_loader=None):
    """`engine`: an already loaded Engine (tests share one); else `engine_loader()` or the settings' model."""
    from fastapi import FastAPI
    from fastapi.staticfiles import StaticFiles

    from zimage.server.auth import bearer_scheme
    from zimage.server.guard import BodyLimit, RequestGuard
    from zimage.server.inputs import upload_limits
    from zimage.server.openapi import install_openapi
    from zimage.server.events import EventHub
    from zimage.server.jobs import JobStore
    from zimage.server.metrics import Metrics
    from zimage.server.routes import build_router, build_public_router
    from zimage.server.worker import Worker
    from zimage.version import __version__

    settings = settings or ServerSettings()
    loader = (lambda: engine) if engine is not None else (engine_loader or default_loader(settings))
    signer = make_signer(settings)

    @asynccontextmanager
    async def lifespan(app):
        store = JobStore.from_settings(settings)
        hub = EventHub()
        hub.bind(asyncio.get_running_loop())
        metrics = Metrics(lambda: state.worker.engine)
        state = ServerState(settings, store, hub, metrics, Worker(store, hub, metrics, settings, loader), signer)
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
    install_openapi(app)

    # Middleware added last runs first: metrics see every answer; CORS answers preflights (which carry no key)
    # and labels refusals; the guard refuses a missing key or a declared oversized body before any route or body
    # read; starlette's body limit (guard.BodyLimit, its limit chosen by path) counts the bytes of a body as they
    # arrive (chunked too) and raises 413 at the first byte over, which the routes answer as JSON. (FastAPI's own
    # max_body_size sits outside every user middleware and would replace the guard's JSON 413 by plain text.)
    limits = upload_limits(settings)  # larger bodies for the routes that take pictures
    app.add_middleware(BodyLimit, max_body_bytes=MAX_BODY_BYTES, path_limits=limits)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=MAX_BODY_BYTES, signer=signer,
                       path_limits=limits)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-API-Key"])
    app.add_middleware(HttpMetrics)

    public, api = build_public_router(), build_router()
    app.include_router(public)
    app.include_router(api, dependencies=[_depends(bearer_scheme())])
    # Every route with its methods, for the Allow header of a 405 (errors.allowed_methods): the routers' own
    # lists, since FastAPI keeps included routers as opaque entries in app.routes.
    app.state.method_routes = [r for r in (*app.routes, *public.routes, *api.routes) if getattr(r, "methods", None)]
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def make_signer(settings: ServerSettings):
    """Image URLs are signed only where they need to be: with an API key (without one they are open anyway)."""
    if not settings.api_key or settings.url_ttl_s <= 0:
        return None
    from zimage.server.signing import UrlSigner, load_or_create_secret

    secret = settings.url_secret.encode() if settings.url_secret else load_or_create_secret(settings.data_dir)
    return UrlSigner(secret, settings.url_ttl_s)


class HttpMetrics:
    """Times each request into the metrics. Pure ASGI (BaseHTTPMiddleware would hide client disconnects from the
    routes)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
