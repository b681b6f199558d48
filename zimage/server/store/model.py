"""What the job store holds, whatever the backend: the record, the id and name patterns, the batch key."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

TERMINAL = ("succeeded", "failed", "cancelled")
JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")
IMAGE_NAME = re.compile(r"^(job_[0-9a-f]{24})-([0-9]{1,2})\.(png|jpeg|webp)$")
EXT = {"png": "png", "jpeg": "jpeg", "webp": "webp"}


class StoreUnavailable(Exception):
    """The database cannot be reached (PostgreSQL down or restarting, SQLite locked past its timeout). The HTTP
    layer answers 503; nothing accepted is lost, since a job is only acknowledged once committed."""


@dataclass
class JobRecord:
    id: str
    seq: int
    status: str
    params: dict
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0  # runs started (more than 1 after a crash)
    images: list = field(default_factory=list)  # [{"id", "index", "seed"}], set with status 'succeeded'
    error: dict | None = None  # {"message", "type", "code"} when failed
    worker: str | None = None  # who holds (or last held) it
    lease_until: float | None = None  # claim path: end of the lease, database clock; None on the single-worker path
    bytes: int = 0  # size of its image files
    unfetched: int = 0  # bit i set: image i not yet handed to a client (retention never removes such a job)
    fetched: float | None = None  # last time one of its images was handed out

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


def batch_key(params: dict) -> str:
    """Jobs with equal keys can share one engine call (the engine batches only equal size, steps and guidance, and
    for jobs that start from a picture, equal strength and kind: GenerateRequest.batch_key). Steps or guidance None
    (the model's recipe) is its own value: such jobs batch with each other."""
    guidance = params["guidance"] if params["guidance"] is None else float(params["guidance"])
    key = f"{params['width']}x{params['height']}:{params['steps']}:{guidance!r}"
    if params.get("image_sha256"):  # (zimage/server/inputs.py) text-only keys stay as they were stored
        key += f":image:{float(params['strength'])!r}:{'mask' if params.get('mask_sha256') else 'nomask'}"
    return key


def interrupted_error(max_attempts: int) -> dict:
    return {"message": f"the server stopped while running this job {max_attempts} times",
            "type": "server_error", "code": "interrupted"}


COLUMNS = ("id, seq, status, params, created, started, finished, attempts, images, error, worker, lease_until, "
           "bytes, unfetched, fetched")


def record_from_row(row) -> JobRecord:
    (id_, seq, status, params, created, started, finished, attempts, images, error, worker, lease_until, nbytes,
     unfetched, fetched) = row
    return JobRecord(id_, seq, status, json.loads(params), created, started, finished, attempts, json.loads(images),
                     json.loads(error) if error else None, worker, lease_until, nbytes, unfetched, fetched)
