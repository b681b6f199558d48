"""The routes. Public: /health and the page. Everything else is behind the API key (when one is set).

The job store is synchronous SQLite (synchronous=FULL: a commit waits for the disk) and images are files: every
call into them runs in a worker thread (asyncio.to_thread), never on the event loop, which serves every other
request and stream meanwhile.
"""

import asyncio
import base64
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.convertors import CONVERTOR_TYPES, register_url_convertor

from zimage.server.app import STATIC_DIR, get_state
from zimage.server.edits import add_edits_route
from zimage.server.errors import ApiError
from zimage.server.events import TERMINAL_EVENTS, format_sse
from zimage.server.image_stream import image_events
from zimage.server.images import MEDIA_TYPES
from zimage.server.inputs import ImageJobCreate
from zimage.server.loras import build_lora_router, check_request_loras
from zimage.server.schemas import (
    ErrorBody, Health, ImageData, ImageGenerationRequest, ImageGenerationResponse, Job, JobCreate, JobList,
    ModelCard, ModelList, ServerStatus,
)
from zimage.server.views import job_view
from zimage.server.worker import QueueFull, Unavailable
from zimage.version import __version__

class ImageNameConvertor:
    """Path segment of an image name (`job_<24 hex>-<i>.<ext>`, as jobs.py names them). So that
    /v1/images/generations is not taken for an image name: any method but POST there is a 405, not a 404."""

    regex = r"job_[0-9a-f]{24}-[0-9]{1,2}\.(?:png|jpeg|webp)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# Starlette looks convertors up by name in one registry; adding a name of our own changes no other route.
if "image_name" not in CONVERTOR_TYPES:
    register_url_convertor("image_name", ImageNameConvertor())

KEEPALIVE_S = 15.0  # SSE comment line so that proxies keep an idle stream open
STREAM_POLL_S = 1.0  # how often an idle stream checks that jobs can still run
def _errors(*codes: int) -> dict:
    """OpenAPI responses with the error body, for the statuses a route can answer (beyond 401, on every one)."""
    words = {400: "A bad value (`param` names it).",
             404: "No such job or image.",
             409: "The job was cancelled, or already finished.",
             413: "The body is over its limit (larger for pictures: docs/server.md).",
             429: "The queue is full (see Retry-After).", 500: "The generation failed.",
             503: "No job can run: the model failed to load, or the job worker stopped (the message says which)."}
    return {c: {"model": ErrorBody, "description": words[c]} for c in codes}

# Job error codes that mean "no engine could run it now", not "this request failed": a synchronous caller hears 503
# (zimage.deploy raises EngineUnavailable when Ray replicas died under a job twice, or none is reachable).
UNAVAILABLE_CODES = ("engine_unavailable",)

DISCONNECT_POLL_S = 0.5  # how often a waiting synchronous request checks that its client is still there


def build_public_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["server"])
    async def health(request: Request):
        """200 once the model is loaded and warmed up; 503 while loading, or when no job can run (the load failed
        or the worker stopped). Public, so it says only that and the queue: the engine (its model path) and the
        cause of a failure are for authenticated callers, at /v1/status, and in the server log."""
        w = get_state(request).worker
        status, detail = w.health()
        body = Health(status=status, detail=detail, queue=w.queue_length(), running=w.running_count())
        return Response(body.model_dump_json(), 200 if status == "ok" else 503, media_type="application/json")

    @router.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @router.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        """Browsers ask for it whatever the page says; the page links /static/favicon.svg."""
        return Response(status_code=204)

    return router


def build_router() -> APIRouter:
    router = APIRouter(responses={401: {"model": ErrorBody}})

    @router.get("/metrics", tags=["server"], response_class=Response)
    async def metrics(request: Request):
        """Prometheus text format: queue depth, latencies, images, errors by kind, VRAM (CUDA)."""
        return Response(get_state(request).metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/status", response_model=ServerStatus, tags=["server"])
    async def server_status(request: Request):
        """/health for authenticated callers: also the engine (model, path, device, dtype, memory plan, speed)
        and, when the server failed, the cause."""
        w = get_state(request).worker
        status, detail = w.health()
        return ServerStatus(status=status, detail=detail, error=w.error, queue=w.queue_length(),
                            running=w.running_count(), engine=w.engine.describe() if w.engine is not None else None,
                            version=__version__)

    @router.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def models(request: Request):
        engine = get_state(request).worker.engine
        name = engine.describe()["model"] if engine is not None else get_state(request).settings.engine.model
        return ModelList(data=[ModelCard(id=name)])

    @router.post("/v1/images/generations", response_model=ImageGenerationResponse, tags=["openai"],
                 response_model_exclude_none=True,
                 responses={200: {"content": {"text/event-stream": {}}, "description": "JSON; with stream: true, "
                                  "server-sent events (image_generation.partial_image, image_generation.completed, "
                                  "error)."}, **_errors(400, 409, 429, 500, 503)})
    async def generations(body: ImageGenerationRequest, request: Request):
        """OpenAI's images API. The request is stored as a job (so a crash loses nothing) and awaited; a client
        that disconnects cancels it. With `stream: true` the answer is OpenAI's image streaming events
        (text/event-stream): image_generation.partial_image, image_generation.completed, or error."""
        state = get_state(request)
        body.check_openai_options()
        job = await _submit(state, body)
        if body.stream:
            return StreamingResponse(image_events(state, job, body, request, DISCONNECT_POLL_S),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await images_response(state, job, body, request)

    add_edits_route(router, _errors(400, 409, 413, 429, 500, 503), _submit, images_response)  # (edits.py)

    @router.post("/v1/jobs", response_model=Job, status_code=202, tags=["jobs"],
                 responses=_errors(400, 413, 429, 503))
    async def create_job(body: ImageJobCreate, request: Request):
        """Queue a generation and return its id at once (the job is stored before this answers). With `image`
        (and `mask`), base64: img2img (inpainting); see docs/server.md, "Image inputs"."""
        state = get_state(request)
        return job_view(state, await _submit(state, body, body.inputs()))

    @router.get("/v1/jobs", response_model=JobList, tags=["jobs"], responses=_errors(400))
    async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100, description="Newest first.")):
        state = get_state(request)
        jobs = await asyncio.to_thread(state.store.list, limit=limit)
        return JobList(data=[job_view(state, j) for j in jobs])

    @router.get("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=_errors(404))
    async def get_job(job_id: str, request: Request):
        state = get_state(request)
        return job_view(state, await _find(state, job_id))

    @router.delete("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=_errors(404, 409))
    async def cancel_job(job_id: str, request: Request):
        """Cancel: a queued job never runs; a running one stops at the next step. 409 if it already finished."""
        state = get_state(request)
        job = await _find(state, job_id)
        if job.status != "cancelled" and not await asyncio.to_thread(state.worker.cancel, job_id):
            job = await _find(state, job_id)
            if job.status != "cancelled":
                raise ApiError(409, f"job {job_id} already {job.status}", "job_finished", "job_id")
        return job_view(state, await _find(state, job_id))

    @router.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events: queued {position}, "
              "running, progress {phase, step, total}, preview {step, image}, then succeeded {job} | "
              "failed {job} | cancelled {job}; the stream ends after that."}, **_errors(404)})
    async def job_events(job_id: str, request: Request):
        state = get_state(request)
        await _find(state, job_id)
        queue = state.hub.subscribe(job_id)  # before reading the state, so no event falls between
        return StreamingResponse(_stream(state, job_id, queue, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/images/{name:image_name}", tags=["jobs"], response_class=FileResponse,
                responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, **_errors(404)})
    async def image_file(name: str, request: Request,
                         expires: str | None = Query(None, description="Of a signed URL: its expiry (Unix s)."),
                         sig: str | None = Query(None, description="Of a signed URL: its signature. A signed URL "
                                                                   "needs no API key (checked before routing).")):
        """An image of a finished job, by the id in its job (e.g. job_...-0.png); the URLs in jobs carry a
        signature when the server has an API key."""
        store = get_state(request).store
        headers = {"Cache-Control": "private, max-age=31536000, immutable"}
        media_type = MEDIA_TYPES.get(name.rsplit(".", 1)[-1])
        if store.images_dir is not None:  # on this machine: sent from the file
            path = await asyncio.to_thread(store.image_path, name)
            if path is None:
                raise ApiError(404, "no such image", "not_found", "name")
            return FileResponse(path, media_type=media_type, headers=headers)
        data = await asyncio.to_thread(store.read_image, name)  # at an fsspec URL (object store): read, then sent
        if data is None:
            raise ApiError(404, "no such image", "not_found", "name")
        return Response(data, media_type=media_type, headers=headers)

    router.include_router(build_lora_router())  # GET /v1/loras (zimage/server/loras.py)
    return router


async def images_response(state, job, body, request: Request) -> ImageGenerationResponse:
    """OpenAI's answer for a submitted job, once it finished (generations and edits): images inline or as URLs."""
    job = await _wait(state, job.id, request)
    if job.status != "succeeded":
        if job.status == "cancelled":
            raise ApiError(409, "the job was cancelled", "cancelled")
        err = job.error or {}
        status = 503 if err.get("code") in UNAVAILABLE_CODES else 500
        raise ApiError(status, err.get("message", "generation failed"), err.get("code", "generation_failed"))
    view = job_view(state, job)
    data = []
    for img in view.images:
        if body.response_format == "url":
            data.append(ImageData(url=img.url, revised_prompt=body.prompt, seed=img.seed))
        else:
            raw = await asyncio.to_thread(state.store.read_image, img.id)
            data.append(ImageData(b64_json=base64.b64encode(raw).decode(), revised_prompt=body.prompt,
                                  seed=img.seed))
    p = view.params
    return ImageGenerationResponse(created=int(job.created), data=data, output_format=p.output_format,
                                   size=f"{p.width}x{p.height}", warnings=view.warnings or None)


async def _submit(state, body: JobCreate, inputs=None):
    """`inputs`: the pictures of an img2img / inpainting request (inputs.JobInputs), or None."""
    s = state.settings
    req = body.to_engine(s.default_size, s.default_steps)  # UsageError -> 400 naming the field
    await asyncio.to_thread(check_request_loras, state, req.loras)  # ApiError 400 before the job exists
    if inputs is not None:  # decoding a picture takes a while: off the event loop
        req = await asyncio.to_thread(inputs.apply, req, body.size)
    params = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "width": req.width,
              "height": req.height, "steps": req.steps, "guidance": req.guidance, "seed": req.seed, "n": req.n,
              "output_format": body.output_format, "output_compression": body.output_compression,
              "loras": [{"name": spec.name, "scale": spec.scale} for spec in req.loras]}
    if inputs is not None:  # checked: now kept in the store, before the job is committed
        params.update(inputs.params(req, body.size))
        await asyncio.to_thread(inputs.save, state.store)
    try:
        return await asyncio.to_thread(state.worker.submit, params, req)  # commits to the store
    except QueueFull as e:
        state.metrics.errors.labels("queue_full").inc()
        raise ApiError(429, str(e), "queue_full", headers={"Retry-After": str(e.retry_after)}) from None
    except Unavailable as e:
        raise unavailable(str(e)) from None


def unavailable(reason: str) -> ApiError:
    return ApiError(503, reason, "engine_unavailable")


async def _find(state, job_id: str):
    job = await asyncio.to_thread(state.store.get, job_id)  # ids are matched against their pattern: '../x' is not found
    if job is None:
        raise ApiError(404, "no such job", "not_found", "job_id")
    return job


async def _wait(state, job_id: str, request: Request):
    """Until the job is finished; cancels it if the client goes away (checked every DISCONNECT_POLL_S, also
    while progress events keep arriving)."""
    queue = state.hub.subscribe(job_id)
    try:
        job = await asyncio.to_thread(state.store.get, job_id)
        last_check = time.monotonic()
        while not job.terminal:
            try:
                event, _ = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:  # (on 3.10 not the builtin TimeoutError; on 3.11+ the same class)
                event = None
            if event is None or event in TERMINAL_EVENTS:
                job = await asyncio.to_thread(state.store.get, job_id)
            if not job.terminal and time.monotonic() - last_check >= DISCONNECT_POLL_S:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    await asyncio.to_thread(state.worker.cancel, job_id)
                    raise ApiError(409, "the client disconnected", "client_disconnected")
                if (reason := state.worker.unavailable()) is not None:
                    # The job would wait for a restart; this client is told now, and its job does not outlive it.
                    await asyncio.to_thread(state.worker.cancel, job_id)
                    raise unavailable(reason)
        return job
    finally:
        state.hub.unsubscribe(job_id, queue)


async def _stream(state, job_id: str, queue, request: Request):
    try:
        job = await asyncio.to_thread(state.store.get, job_id)
        if job.terminal:
            yield format_sse(job.status, {"job": _job_json(state, job, request)})
            return
        if job.status == "queued":
            yield format_sse("queued", {"position": state.worker.position(job_id)})
        else:
            yield format_sse("running", {})
            if (prog := state.worker.progress(job_id)) is not None:
                yield format_sse("progress", prog)
        last_preview = 0.0
        last_sent = time.monotonic()
        while True:
            try:
                event, data = await asyncio.wait_for(queue.get(), timeout=STREAM_POLL_S)
            except asyncio.TimeoutError:  # (on 3.10 not the builtin TimeoutError; on 3.11+ the same class)
                if (reason := state.worker.unavailable()) is not None:
                    # The job stays queued for a restart; the stream ends here instead of idling forever.
                    yield format_sse("error", unavailable(reason).body())
                    return
                if time.monotonic() - last_sent >= KEEPALIVE_S:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                continue
            last_sent = time.monotonic()
            if event in TERMINAL_EVENTS:
                job = await asyncio.to_thread(state.store.get, job_id)
                yield format_sse(event, {"job": _job_json(state, job, request)})
                return
            if event == "preview":
                if time.monotonic() - last_preview < 0.2:
                    continue  # at most 5 previews a second
                last_preview = time.monotonic()
            yield format_sse(event, data)
    finally:
        state.hub.unsubscribe(job_id, queue)


def _job_json(state, job, request) -> dict:
    return job_view(state, job).model_dump(mode="json")
