"""JobStore: jobs in SQLite (WAL), images as files under <data_dir>/images. This is what makes "no job lost" true.

Rules (each a single conditional UPDATE, so they hold across threads and across a kill -9 at any instant):
- a job is written (status 'queued') and committed before the client hears its id;
- queued -> running -> succeeded | failed; queued | running -> cancelled;
- a job is marked succeeded only `WHERE status = 'running'`, in the same transaction that records its images,
  so it completes at most once; its files are written (atomically, fixed names) before that commit;
- on start-up, jobs left 'running' by a crash go back to 'queued' (attempts counts the runs started); terminal
  jobs are never touched again.
File names are chosen here (`<job id>-<index>.<ext>`, ids are random hex): never taken from user input.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TERMINAL = ("succeeded", "failed", "cancelled")
JOB_ID = re.compile(r"^job_[0-9a-f]{24}$")
IMAGE_NAME = re.compile(r"^(job_[0-9a-f]{24})-([0-9]{1,2})\.(png|jpeg|webp)$")
EXT = {"png": "png", "jpeg": "jpeg", "webp": "webp"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,            -- submission order (the queue order after a restart)
    status TEXT NOT NULL,
    params TEXT NOT NULL,            -- JSON: schemas.JobParams (size resolved, seed drawn)
    created REAL NOT NULL, started REAL, finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    images TEXT NOT NULL DEFAULT '[]',  -- JSON list of {"id", "index", "seed"}; set with status 'succeeded'
    error TEXT                       -- JSON {"message", "type", "code"} when failed
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


@dataclass
class JobRecord:
    id: str
    seq: int
    status: str
    params: dict
    created: float
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    images: list = field(default_factory=list)
    error: dict | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def new_job_id() -> str:
    return "job_" + secrets.token_hex(12)


class JobStore:
    """Thread-safe (one connection, one lock: writes are few and small)."""

    def __init__(self, db_path: Path, images_dir: Path):
        self.images_dir = Path(images_dir)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed job survives power loss too, not just kill -9
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---------------------------------------------------------------- writes
    def add(self, params: dict) -> JobRecord:
        now = time.time()
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            job = JobRecord(new_job_id(), seq, "queued", params, now)
            self._db.execute("INSERT INTO jobs (id, seq, status, params, created) VALUES (?, ?, 'queued', ?, ?)",
                             (job.id, seq, json.dumps(params), now))
        return job

    def recover(self, max_attempts: int) -> tuple[list[JobRecord], list[str]]:
        """After a restart: running -> queued (or failed after `max_attempts` runs). Returns (queued jobs in
        submission order, ids failed here)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute("SELECT id, attempts FROM jobs WHERE status = 'running'").fetchall()
            failed = [i for i, a in rows if a >= max_attempts]
            error = json.dumps({"message": f"the server stopped while running this job {max_attempts} times",
                                "type": "server_error", "code": "interrupted"})
            for job_id in failed:
                self._db.execute("UPDATE jobs SET status='failed', finished=?, error=? WHERE id=?",
                                 (time.time(), error, job_id))
            self._db.execute("UPDATE jobs SET status='queued', started=NULL WHERE status='running'")
        return self.list(status="queued", oldest_first=True), failed

    def start(self, job_ids: list[str]) -> list[str]:
        """queued -> running for those still queued; returns them."""
        started = []
        now = time.time()
        with self._lock:
            for job_id in job_ids:
                cur = self._db.execute("UPDATE jobs SET status='running', started=?, attempts=attempts+1 "
                                       "WHERE id=? AND status='queued'", (now, job_id))
                if cur.rowcount:
                    started.append(job_id)
        return started

    def requeue(self, job_id: str) -> bool:
        """running -> queued, not counting the interrupted run (a graceful shutdown, or a batch split up)."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status='queued', started=NULL, attempts=MAX(attempts-1, 0) "
                                   "WHERE id=? AND status='running'", (job_id,))
            return cur.rowcount == 1

    def succeed(self, job_id: str, images: list[dict]) -> bool:
        """running -> succeeded with its images, once. False if it was cancelled meanwhile."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status='succeeded', finished=?, images=? "
                                   "WHERE id=? AND status='running'", (time.time(), json.dumps(images), job_id))
            return cur.rowcount == 1

    def fail(self, job_id: str, error: dict) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status='failed', finished=?, error=? "
                                   "WHERE id=? AND status IN ('queued', 'running')",
                                   (time.time(), json.dumps(error), job_id))
            return cur.rowcount == 1

    def cancel(self, job_id: str) -> bool:
        """queued | running -> cancelled. False if the job had already finished."""
        with self._lock:
            cur = self._db.execute("UPDATE jobs SET status='cancelled', finished=? "
                                   "WHERE id=? AND status IN ('queued', 'running')", (time.time(), job_id))
            return cur.rowcount == 1

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id or ""):
            return None
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _record(row) if row else None

    def list(self, status: str | None = None, limit: int = 1_000_000, oldest_first: bool = False) -> list[JobRecord]:
        order = "ASC" if oldest_first else "DESC"
        where, args = ("WHERE status=?", (status,)) if status else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY seq {order} LIMIT ?",
                                    (*args, limit)).fetchall()
        return [_record(r) for r in rows]

    # ---------------------------------------------------------------- files
    def image_name(self, job_id: str, index: int, output_format: str) -> str:
        assert JOB_ID.match(job_id) and 0 <= index < 100
        return f"{job_id}-{index}.{EXT[output_format]}"

    def write_image(self, name: str, data: bytes) -> Path:
        """Atomic: the file is complete or absent (a crash mid-write leaves only a .part that is ignored)."""
        path = self.images_dir / name
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=self.images_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def image_path(self, name: str) -> Path | None:
        """The file of a finished job's image, or None. `name` is checked against the id pattern and against the
        job's record (the file must belong to a succeeded job), so no other file can be reached."""
        m = IMAGE_NAME.match(name or "")
        if not m:
            return None
        job = self.get(m.group(1))
        if job is None or job.status != "succeeded" or name not in {i["id"] for i in job.images}:
            return None
        path = (self.images_dir / name).resolve()
        if path.parent != self.images_dir.resolve() or not path.is_file():
            return None
        return path


_COLUMNS = "id, seq, status, params, created, started, finished, attempts, images, error"


def _record(row) -> JobRecord:
    id_, seq, status, params, created, started, finished, attempts, images, error = row
    return JobRecord(id_, seq, status, json.loads(params), created, started, finished, attempts,
                     json.loads(images), json.loads(error) if error else None)
