"""Stored job record -> the API's Job model (URLs built from the request, or from --public-url)."""

from __future__ import annotations

from zimage.server.schemas import ErrorInfo, Job, JobImage, JobParams, JobProgress


def base_url(state, request) -> str:
    return (state.settings.public_url or str(request.base_url)).rstrip("/")


def job_view(state, job, request) -> Job:
    base = base_url(state, request)
    position = state.worker.position(job.id) if job.status == "queued" else None
    prog = state.worker.progress(job.id) if job.status == "running" else None
    return Job(
        id=job.id, status=job.status, created=job.created, started=job.started, finished=job.finished,
        attempts=job.attempts, position=position, progress=JobProgress(**prog) if prog else None,
        params=JobParams(**job.params),
        images=[JobImage(id=i["id"], url=f"{base}/v1/images/{i['id']}", index=i["index"], seed=i["seed"])
                for i in job.images],
        error=ErrorInfo(type=job.error.get("type", "server_error"), message=job.error["message"],
                        code=job.error.get("code")) if job.error else None,
    )
