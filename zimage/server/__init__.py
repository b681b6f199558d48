"""The HTTP server: OpenAI-compatible images API, async jobs with progress, a web page, persistence.

    settings.py  ServerSettings (one dataclass, one source of defaults; the engine as one EngineConfig)
    app.py       create_app(settings, engine=None): routes, lifespan (load + warm the engine once)
    schemas.py   pydantic request/response models, converted once into zimage.GenerateRequest
    jobs.py      JobStore: SQLite (WAL) + image files under the data dir; what makes "no job lost" true
    worker.py    one worker thread: bounded queue, dynamic batching, cancellation, progress
    events.py    per-job event hub (worker thread -> asyncio) and SSE formatting
    guard.py     ASGI guard: the API key and the declared body size, before routing and before any body is read
    auth.py      optional API key, constant-time check
    signing.py   signed, expiring image URLs (HMAC-SHA256, the secret in the data dir)
    image_stream.py  OpenAI's image streaming events (stream: true on /v1/images/generations)
    openapi.py   the schema as the server answers (400 with the error body, not FastAPI's 422)
    size_text.py 'WIDTHxHEIGHT' checked (ASCII digits, range) before zimage.sizes parses it
    errors.py    {"error": {...}} bodies for every failure
    metrics.py   Prometheus metrics on a private registry
    launch.py    serve(settings) (blocking) and start_in_thread(...) for tests and the load test

Importing this package does not import fastapi or torch; `create_app` does.
"""

from zimage.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from zimage.server.app import create_app

        return create_app
    raise AttributeError(f"module 'zimage.server' has no attribute {name!r}")
