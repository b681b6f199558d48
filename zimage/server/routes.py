"""The routes. Public: /health and the page. Everything else is behind the API key (when one is set)."""

import asyncio
import base64
import time

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from zimage.server.app import STATIC_DIR, get_state
from zimage.server.errors import ApiError
from zimage.server.events import TERMINAL_EVENTS, format_sse
from zimage.server.images import MEDIA_TYPES
from zimage.server.schemas import (
    ErrorBody, Health, ImageData, ImageGenerationRequest, ImageGenerationResponse, Job, JobCreate, JobList,
    ModelCard, ModelList,
)
from zimage.server.views import job_view
from zimage.server.worker import QueueFull

KEEPALIVE_S = 15.0  # SSE comment line so that proxies keep an idle stream open
_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 429)}

# Job error codes that mean "no engine could run it now", not "this request failed": a synchronous caller hears 503
# (zimage.deploy raises EngineUnavailable when Ray replicas died under a job twice, or none is reachable).
UNAVAILABLE_CODES = ("engine_unavailable",)

DISCONNECT_POLL_S = 0.5  # how often a waiting synchronous request checks that its client is still there


def build_public_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["server"])
    async def health(request: Request):
        """200 once the model is loaded and warmed up; 503 while loading (or if loading failed)."""
        state = get_state(request)
        w = state.worker
        body = Health(status=w.state, detail=w.detail, queue=w.queue_length(),
                      engine=w.engine.describe() if w.state == "ok" else None)
        return Response(body.model_dump_json(), 200 if w.state == "ok" else 503, media_type="application/json")

    @router.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    return router


def build_router() -> APIRouter:
    router = APIRouter(responses={401: {"model": ErrorBody}})

    @router.get("/metrics", tags=["server"], response_class=Response)
    async def metrics(request: Request):
        """Prometheus text format: queue depth, latencies, images, errors by kind, VRAM (CUDA)."""
        return Response(get_state(request).metrics.render(), media_type="text/plain; version=0.0.4")

    @router.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def models(request: Request):
        engine = get_state(request).worker.engine
        name = engine.describe()["model"] if engine is not None else get_state(request).settings.model
        return ModelList(data=[ModelCard(id=name)])

    @router.post("/v1/images/generations", response_model=ImageGenerationResponse, tags=["openai"],
                 response_model_exclude_none=True,
                 responses={**_ERRORS, 500: {"model": ErrorBody}})
    async def generations(body: ImageGenerationRequest, request: Request):
        """OpenAI's images API. The request is stored as a job (so a crash loses nothing) and awaited; a client
        that disconnects cancels it."""
        state = get_state(request)
        job = _submit(state, body)
        job = await _wait(state, job.id, request)
        if job.status != "succeeded":
            if job.status == "cancelled":
                raise ApiError(409, "the job was cancelled", "cancelled")
            err = job.error or {}
            status = 503 if err.get("code") in UNAVAILABLE_CODES else 500
            raise ApiError(status, err.get("message", "generation failed"), err.get("code", "generation_failed"))
        view = job_view(state, job, request)
        data = []
        for img in view.images:
            if body.response_format == "url":
                data.append(ImageData(url=img.url, revised_prompt=body.prompt, seed=img.seed))
            else:
                raw = state.store.read_image(img.id)
                data.append(ImageData(b64_json=base64.b64encode(raw).decode(), revised_prompt=body.prompt,
                                      seed=img.seed))
        p = view.params
        return ImageGenerationResponse(created=int(job.created), data=data, output_format=p.output_format,
                                       size=f"{p.width}x{p.height}")

    @router.post("/v1/jobs", response_model=Job, status_code=202, tags=["jobs"], responses=_ERRORS)
    async def create_job(body: JobCreate, request: Request):
        """Queue a generation and return its id at once (the job is stored before this answers)."""
        state = get_state(request)
        return job_view(state, _submit(state, body), request)

    @router.get("/v1/jobs", response_model=JobList, tags=["jobs"])
    async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100, description="Newest first.")):
        state = get_state(request)
        return JobList(data=[job_view(state, j, request) for j in state.store.list(limit=limit)])

    @router.get("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=_ERRORS)
    async def get_job(job_id: str, request: Request):
        state = get_state(request)
        return job_view(state, _find(state, job_id), request)

    @router.delete("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"], responses=_ERRORS)
    async def cancel_job(job_id: str, request: Request):
        """Cancel: a queued job never runs; a running one stops at the next step. 409 if it already finished."""
        state = get_state(request)
        job = _find(state, job_id)
        if job.status != "cancelled" and not state.worker.cancel(job_id):
            job = _find(state, job_id)
            if job.status != "cancelled":
                raise ApiError(409, f"job {job_id} already {job.status}", "job_finished", "job_id")
        return job_view(state, _find(state, job_id), request)

    @router.get("/v1/jobs/{job_id}/events", tags=["jobs"], responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-sent events: queued {position}, "
              "running, progress {phase, step, total}, preview {step, image}, then succeeded {job} | "
              "failed {job} | cancelled {job}; the stream ends after that."}, **_ERRORS})
    async def job_events(job_id: str, request: Request):
        state = get_state(request)
        _find(state, job_id)
        queue = state.hub.subscribe(job_id)  # before reading the state, so no event falls between
        return StreamingResponse(_stream(state, job_id, queue, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/images/{name}", tags=["jobs"], response_class=FileResponse,
                responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, 404: {"model": ErrorBody}})
    async def image_file(name: str, request: Request):
        """An image of a finished job, by the id in its job (e.g. job_...-0.png)."""
        store = get_state(request).store
        headers = {"Cache-Control": "private, max-age=31536000, immutable"}
        media_type = MEDIA_TYPES.get(name.rsplit(".", 1)[-1])
        if store.images_dir is not None:  # on this machine: sent from the file
            path = store.image_path(name)
            if path is None:
                raise ApiError(404, "no such image", "not_found", "name")
            return FileResponse(path, media_type=media_type, headers=headers)
        data = store.read_image(name)  # at an fsspec URL (object store): read, then sent
        if data is None:
            raise ApiError(404, "no such image", "not_found", "name")
        return Response(data, media_type=media_type, headers=headers)

    return router


def _submit(state, body: JobCreate):
    s = state.settings
    req = body.to_engine(s.default_size, s.default_steps)  # UsageError -> 400 naming the field
    params = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "width": req.width,
              "height": req.height, "steps": req.steps, "guidance": req.guidance, "seed": req.seed, "n": req.n,
              "output_format": body.output_format, "output_compression": body.output_compression}
    try:
        return state.worker.submit(params, req)
    except QueueFull as e:
        state.metrics.errors.labels("queue_full").inc()
        raise ApiError(429, str(e), "queue_full", headers={"Retry-After": str(e.retry_after)}) from None


def _find(state, job_id: str):
    job = state.store.get(job_id)  # ids are checked against their pattern first: '../x' is simply not found
    if job is None:
        raise ApiError(404, "no such job", "not_found", "job_id")
    return job


async def _wait(state, job_id: str, request: Request):
    """Until the job is finished; cancels it if the client goes away (checked every DISCONNECT_POLL_S, also
    while progress events keep arriving)."""
    queue = state.hub.subscribe(job_id)
    try:
        job = state.store.get(job_id)
        last_check = time.monotonic()
        while not job.terminal:
            try:
                event, _ = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
            except TimeoutError:
                event = None
            if event is None or event in TERMINAL_EVENTS:
                job = state.store.get(job_id)
            if not job.terminal and time.monotonic() - last_check >= DISCONNECT_POLL_S:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    state.worker.cancel(job_id)
                    raise ApiError(409, "the client disconnected", "client_disconnected")
        return job
    finally:
        state.hub.unsubscribe(job_id, queue)


async def _stream(state, job_id: str, queue, request: Request):
    try:
        job = state.store.get(job_id)
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
        while True:
            try:
                event, data = await asyncio.wait_for(queue.get(), timeout=KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if event in TERMINAL_EVENTS:
                yield format_sse(event, {"job": _job_json(state, state.store.get(job_id), request)})
                return
            if event == "preview":
                if time.monotonic() - last_preview < 0.2:
                    continue  # at most 5 previews a second
                last_preview = time.monotonic()
            yield format_sse(event, data)
    finally:
        state.hub.unsubscribe(job_id, queue)


def _job_json(state, job, request) -> dict:
    return job_view(state, job, request).model_dump(mode="json")
