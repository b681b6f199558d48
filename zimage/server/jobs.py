"""JobStore: the jobs (SQLite on one machine, PostgreSQL for a cluster) and their image files (a directory or an
fsspec URL). This is what makes "no job lost" true; the rules are in zimage/server/store/sql.py.

- A job is written (status 'queued') and committed before the client hears its id.
- queued -> running -> succeeded | failed; queued | running -> cancelled. Each transition is one conditional UPDATE.
- A job is marked succeeded only while running and held by the caller, in the transaction that records its
  images; the files are written (atomically, fixed names) before that commit. So it completes at most once.
- Single worker (`zimage serve`, the Ray ingress): `start`, and at the next start-up `recover`, which puts back
  what a crash left running (the drawn seed is stored, so the re-run makes the same images).
- Several workers on one database: `claim` with a lease, `renew` while running, `expire` to put back the jobs of a
  worker that stopped renewing.
File names are chosen here (`<job id>-<index>.<ext>`, ids are random hex): never taken from user input.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

from zimage.server.store.files import ImageFiles
from zimage.server.store.model import (  # noqa: F401 - the public names of the store
    EXT, IMAGE_NAME, JOB_ID, TERMINAL, JobRecord, StoreUnavailable, batch_key, new_job_id,
)
from zimage.server.store.retention import Retention, RetentionThread, remove_orphans, sweep

log = logging.getLogger("zimage.server")


def open_database(location: str | Path):
    """A Path or plain path: SQLite. `sqlite:///abs/path.db`, `postgresql://...` (or `postgres://`): as named."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ValueError("a postgresql:// database needs psycopg: pip install 'zimage[postgres]'") from None
        from zimage.server.store.postgres import PostgresJobs

        return PostgresJobs(text)
    from zimage.server.store.sqlite import SqliteJobs

    if text.startswith("sqlite:///"):
        return SqliteJobs(Path(text[len("sqlite://"):]))
    if "://" in text:
        raise ValueError(f"unknown database URL {text!r}: use postgresql://..., sqlite:///path, or a file path")
    return SqliteJobs(Path(text))


class JobStore:
    """Thread-safe. `worker_id` names this process when it runs jobs on the single-worker path (start/recover):
    succeed, fail and requeue default to it."""

    def __init__(self, db: str | Path, images: str | Path, retention: Retention | None = None,
                 worker_id: str | None = None):
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.files = ImageFiles(images)
        self.db = open_database(db)
        self.files.clean_partials()
        self._retention = None
        if retention is not None:
            if retention.max_bytes is not None:
                self._size_old_jobs()
            remove_orphans(self)
            self._retention = RetentionThread(self, retention)
            self._retention.start()

    @classmethod
    def from_settings(cls, settings) -> "JobStore":
        """The store `zimage serve` (and the Ray ingress) opens: --database-url or <data-dir>/jobs.db, --images-url
        or <data-dir>/images, --retention."""
        retention = None
        if settings.retention_age_s is not None or settings.retention_bytes is not None:
            retention = Retention(settings.retention_age_s, settings.retention_bytes)
        return cls(settings.database_url or settings.db_path, settings.images_url or settings.images_dir, retention)

    @property
    def images_dir(self) -> Path | None:
        """The local image directory; None when images live at a remote fsspec URL (see images_url)."""
        return self.files.local

    @property
    def images_url(self) -> str:
        return self.files.url

    def describe(self) -> str:
        return f"{self.db.describe}, images at {self.files.url}"

    def close(self) -> None:
        if self._retention is not None:
            self._retention.stop()
        self.db.close()

    # ---------------------------------------------------------------- submission and the single-worker path
    def add(self, params: dict) -> JobRecord:
        return self.db.add(params)

    def recover(self, max_attempts: int) -> tuple[list[JobRecord], list[str]]:
        """After a restart: running -> queued (or failed after `max_attempts` runs). Returns (queued jobs in
        submission order, ids failed here)."""
        return self.db.recover(self.worker_id, max_attempts)

    def start(self, job_ids: list[str]) -> list[str]:
        """queued -> running for those still queued; returns them."""
        return self.db.start(self.worker_id, job_ids)

    def requeue(self, job_id: str, worker: str | None = None) -> bool:
        """running -> queued, not counting the interrupted run (a graceful shutdown, or a batch split up)."""
        return self.db.requeue(worker or self.worker_id, job_id)

    def succeed(self, job_id: str, images: list[dict], worker: str | None = None) -> bool:
        """running -> succeeded with its images, once. False if it was cancelled meanwhile (or is no longer held
        by `worker`)."""
        nbytes = sum(self.files.size(i["id"]) for i in images)
        return self.db.succeed(worker or self.worker_id, job_id, images, nbytes)

    def fail(self, job_id: str, error: dict, worker: str | None = None) -> bool:
        return self.db.fail(worker or self.worker_id, job_id, error)

    def cancel(self, job_id: str) -> bool:
        """queued | running -> cancelled. False if the job had already finished."""
        return self.db.cancel(job_id)

    # ---------------------------------------------------------------- several workers: leases
    def claim(self, worker_id: str, lease_s: float, limit: int = 1, key: str | None = None) -> list[JobRecord]:
        """Up to `limit` queued jobs that can share an engine call (batch key `key`, or the oldest job's), oldest
        first, now running and leased to `worker_id` for `lease_s` seconds."""
        return self.db.claim(worker_id, lease_s, limit, key)

    def renew(self, worker_id: str, job_ids: list[str], lease_s: float) -> list[str]:
        """Extend the leases `worker_id` still holds; a job missing from the answer was cancelled or taken over."""
        return self.db.renew(worker_id, job_ids, lease_s)

    def expire(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Expired leases: back to 'queued' (run again), or failed after `max_attempts` runs. (requeued, failed)"""
        return self.db.expire(max_attempts)

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id or ""):
            return None
        return self.db.get(job_id)

    def list(self, status: str | None = None, limit: int = 1_000_000, oldest_first: bool = False) -> list[JobRecord]:
        return self.db.list(status, limit, oldest_first)

    # ---------------------------------------------------------------- files
    def image_name(self, job_id: str, index: int, output_format: str) -> str:
        assert JOB_ID.match(job_id) and 0 <= index < 63  # 63: the fetched-images bit mask is a signed 64-bit int
        return f"{job_id}-{index}.{EXT[output_format]}"

    def write_image(self, name: str, data: bytes) -> Path | str:
        """Atomic: the file is complete or absent (a crash mid-write leaves a .part, removed at the next start)."""
        return self.files.write(name, data)

    def image_path(self, name: str) -> Path | None:
        """The local file of a finished job's image, or None (unknown, or images not on this machine: then use
        read_image). Records the image as fetched: the caller is about to hand it out."""
        if self._owned(name) is None:
            return None
        path = self.files.path(name)
        if path is not None:
            self._fetched(name)
        return path

    def read_image(self, name: str) -> bytes | None:
        """The bytes of a finished job's image, wherever it is stored, or None. Records the image as fetched."""
        if self._owned(name) is None:
            return None
        data = self.files.read(name)
        if data is not None:
            self._fetched(name)
        return data

    def _owned(self, name: str) -> JobRecord | None:
        """`name` is checked against the id pattern and against the job's record (the file must belong to a
        succeeded job), so no other file can be reached."""
        m = IMAGE_NAME.match(name or "")
        if not m:
            return None
        job = self.get(m.group(1))
        if job is None or job.status != "succeeded" or name not in {i["id"] for i in job.images}:
            return None
        return job

    def _fetched(self, name: str) -> None:
        m = IMAGE_NAME.match(name)
        self.db.mark_fetched(m.group(1), int(m.group(2)))

    # ---------------------------------------------------------------- retention
    def sweep(self, policy: Retention) -> dict:
        """One retention pass now (the background thread runs these when the store was given a policy)."""
        return sweep(self, policy)

    def _size_old_jobs(self) -> None:
        for job_id, images in self.db.unsized():
            self.db.set_bytes(job_id, sum(self.files.size(i["id"]) for i in images))
