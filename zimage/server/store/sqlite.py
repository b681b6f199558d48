"""SQLite backend: one machine. WAL with synchronous=FULL: a committed job survives power loss, not just kill -9.

One connection per store, guarded by a lock (writes are few and small). Several processes may share the file
(e.g. workers on one machine): writes take SQLite's write lock with BEGIN IMMEDIATE and wait up to BUSY_MS for it,
so a claim reads and updates its rows with no other writer in between.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from zimage.server.store.model import StoreUnavailable, batch_key
from zimage.server.store.sql import SqlJobs

BUSY_MS = 30_000

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
"""
# Added after the first release (ALTER TABLE keeps databases written by earlier versions).
_ADDED = {
    "batch_key": "TEXT NOT NULL DEFAULT ''",   # model.batch_key(params): jobs that can share an engine call
    "worker": "TEXT",                          # who holds (or last held) the job
    "lease_until": "REAL",                     # claim path: end of the lease; NULL on the single-worker path
    "bytes": "INTEGER NOT NULL DEFAULT 0",     # size of its image files
    "unfetched": "INTEGER NOT NULL DEFAULT 0",  # bit i: image i not yet handed to a client
    "fetched": "REAL",                         # last time one of its images was handed out
}
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, batch_key, seq);
"""


class SqliteJobs(SqlJobs):
    NOW = "zimage_now()"  # time.time(), registered below: microseconds (SQLite's own 'now' has milliseconds)

    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.describe = f"sqlite {path}"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=BUSY_MS / 1000)
        self._db.create_function("zimage_now", 0, time.time)
        self._db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction() as run:
            run(_SCHEMA)
            have = {r[1] for r in run("PRAGMA table_info(jobs)").fetchall()}
            for column, decl in _ADDED.items():
                if column not in have:
                    run(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
            if "fetched" not in have:
                # Rows from a version that recorded no fetches: count their images as fetched when they finished,
                # or retention could never remove them.
                run("UPDATE jobs SET fetched = finished WHERE status = 'succeeded'")
            for job_id, params in run("SELECT id, params FROM jobs WHERE batch_key = ''").fetchall():
                run("UPDATE jobs SET batch_key=? WHERE id=?", (batch_key(json.loads(params)), job_id))
            for statement in _INDEXES.strip().splitlines():
                run(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self, readonly: bool = False):
        with self._lock:
            try:
                if not readonly:
                    self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db.execute
                    if not readonly:
                        self._db.execute("COMMIT")
                except BaseException:
                    if not readonly and self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as e:  # locked past BUSY_MS, disk I/O error, read-only or full disk
                raise StoreUnavailable(f"the job database is unavailable ({e})") from e

    def _insert(self, run, job_id: str, params: str, key: str) -> tuple[int, float]:
        return tuple(run(f"INSERT INTO jobs (id, seq, status, params, batch_key, created) VALUES "
                         f"(?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), 'queued', ?, ?, {self.NOW}) "
                         f"RETURNING seq, created", (job_id, params, key)).fetchone())

    def _claim_ids(self, run, limit: int, key: str | None) -> list[str]:
        # BEGIN IMMEDIATE holds the write lock: no other claimer reads between this SELECT and the UPDATE.
        if key is None:
            head = run("SELECT batch_key FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1").fetchone()
            if head is None:
                return []
            key = head[0]
        return [r[0] for r in run("SELECT id FROM jobs WHERE status='queued' AND batch_key=? ORDER BY seq LIMIT ?",
                                  (key, limit)).fetchall()]
