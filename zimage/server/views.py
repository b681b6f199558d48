"""Stored job record -> the API's Job model.

Image URLs are relative (`/v1/images/<name>`), or under --public-url when set: never built from the request's
Host header, which the client chooses. With an API key they carry a signature (signing.py) that opens them
without the key until they expire.
"""

from __future__ import annotations

from zimage.server.schemas import ErrorInfo, Job, JobImage, JobParams, JobProgress, request_warnings


def image_url(state, name: str) -> str:
    url = f"{(state.settings.public_url or '').rstrip('/')}/v1/images/{name}"
    return f"{url}?{state.signer.query(name)}" if state.signer is not None else url


def as_run(state, params: dict) -> dict:
    """A job's params with the steps and guidance it left to the model filled from the loaded engine's recipe
    (zimage.recipe), which is what runs; stored as None, so that a re-run takes the model's recipe again."""
    recipe = getattr(state.worker.engine, "recipe", None)
    if recipe is None or (params.get("steps") is not None and params.get("guidance") is not None):
        return params
    return {**params, "steps": recipe.steps if params.get("steps") is None else params["steps"],
            "guidance": recipe.guidance if params.get("guidance") is None else params["guidance"]}


def job_view(state, job) -> Job:
    params = as_run(state, job.params)
    position = state.worker.position(job.id) if job.status == "queued" else None
    prog = state.worker.progress(job.id) if job.status == "running" else None
    return Job(
        id=job.id, status=job.status, created=job.created, started=job.started, finished=job.finished,
        attempts=job.attempts, position=position, progress=JobProgress(**prog) if prog else None,
        params=JobParams(**params),
        images=[JobImage(id=i["id"], url=image_url(state, i["id"]), index=i["index"], seed=i["seed"])
                for i in job.images],
        error=ErrorInfo(type=job.error.get("type", "server_error"), message=job.error["message"],
                        code=job.error.get("code")) if job.error else None,
        warnings=request_warnings(params),
    )
