"""The job state machine in SQL, shared by the SQLite and PostgreSQL backends (they differ in connections,
placeholders, the clock expression, how a row's submission number is drawn, and how claims lock rows).

Every transition is one conditional UPDATE (`WHERE status = ...`), so it holds across threads, processes and a
kill -9 at any instant:
- queued -> running -> succeeded | failed; queued | running -> cancelled; terminal rows are never changed again.
- A running job records its `worker`. succeed, fail and requeue name the worker and match it, so a worker that
  lost its job (its lease expired and another took it over, or a restarted server recovered it) cannot finish
  it: a job completes at most once, by the worker that holds it.
- The single-worker path (`start`, `recover`: `zimage serve`, the Ray ingress) sets no lease: the process is the
  only worker on its database, and at its next start `recover` takes back what it left running.
- The multi-worker path (`claim`, `renew`, `expire`) leases jobs for `lease_s` seconds of the database's clock;
  a worker that stops renewing (crashed) loses them at expiry and they run again, until `max_attempts` runs were
  started, after which they fail instead of crashing workers forever.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager

from zimage.server.store.model import (
    COLUMNS, JobRecord, StoreUnavailable, batch_key, interrupted_error, new_job_id, record_from_row,
)

log = logging.getLogger("zimage.server")

_LIVE = "status IN ('queued', 'running')"


class SqlJobs:
    """Subclasses set NOW (an SQL expression: seconds since the epoch on the database's clock), and implement
    `_transaction(readonly)` (a context manager yielding `run(sql, args) -> cursor`, SQL written with `?`
    placeholders),
    `_insert(run, id, params, key)` and `_claim_ids(run, limit, key)`."""

    NOW = ""
    retry_s = 30.0  # how long the worker's transitions wait out an unreachable database (see _retrying)

    # ---------------------------------------------------------------- plumbing
    @contextmanager
    def _transaction(self, readonly: bool = False):  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sql(self, text: str) -> str:
        return text.replace("{now}", self.NOW)

    def _once(self, fn, readonly: bool = False):
        """Client-facing calls (submit, status, cancel) fail at once with StoreUnavailable: the client hears 503."""
        with self._transaction(readonly) as run:
            return fn(run)

    def _retrying(self, fn, confirm=None):
        """A worker's transition. A worker that gave up on an unreachable database would strand its job until a
        restart, so this retries for `retry_s`. `confirm(run)` tells, after a retry, whether an earlier attempt
        had in fact committed (its answer was lost with the connection)."""
        deadline = time.monotonic() + self.retry_s
        delay, retried = 0.25, False
        while True:
            try:
                with self._transaction() as run:
                    if retried and confirm is not None and confirm(run):
                        return True
                    return fn(run)
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("the job store is unreachable; retrying in %.2fs", delay)
                time.sleep(delay)
                delay, retried = min(delay * 2, 2.0), True

    # ---------------------------------------------------------------- submission
    def add(self, params: dict) -> JobRecord:
        job_id = new_job_id()

        def insert(run):
            seq, created = self._insert(run, job_id, json.dumps(params), batch_key(params))
            return JobRecord(job_id, seq, "queued", params, created)

        return self._once(insert)

    # ---------------------------------------------------------------- single-worker path
    def recover(self, worker: str, max_attempts: int) -> tuple[list[JobRecord], list[str]]:
        """At start-up of the only worker: jobs left running without a lease (its previous run) or with an expired
        one go back to 'queued', or fail once they were started `max_attempts` times. Returns (queued jobs oldest
        first, ids failed here). Jobs leased by live claimers are left alone."""
        orphaned = "status = 'running' AND (lease_until IS NULL OR lease_until < {now})"

        def go(run):
            failed = [r[0] for r in run(self._sql(
                f"UPDATE jobs SET status='failed', finished={{now}}, error=?, lease_until=NULL "
                f"WHERE {orphaned} AND attempts >= ? RETURNING id"),
                (json.dumps(interrupted_error(max_attempts)), max_attempts)).fetchall()]
            run(self._sql(f"UPDATE jobs SET status='queued', started=NULL, worker=NULL, lease_until=NULL "
                          f"WHERE {orphaned}"))
            rows = run(f"SELECT {COLUMNS} FROM jobs WHERE status='queued' ORDER BY seq ASC").fetchall()
            return [record_from_row(r) for r in rows], failed

        return self._retrying(go)

    def start(self, worker: str, job_ids: list[str]) -> list[str]:
        """queued -> running (held by `worker`, no lease) for those still queued; returns them."""
        def go(run):
            started = []
            for job_id in job_ids:
                cur = run(self._sql("UPDATE jobs SET status='running', started={now}, attempts=attempts+1, "
                                    "worker=?, lease_until=NULL WHERE id=? AND status='queued'"), (worker, job_id))
                if cur.rowcount:
                    started.append(job_id)
            return started

        return self._retrying(go)

    def requeue(self, worker: str, job_id: str) -> bool:
        """running -> queued, not counting the interrupted run (a graceful shutdown, a batch split up, a claimer
        handing a job back)."""
        return self._retrying(lambda run: run(
            "UPDATE jobs SET status='queued', started=NULL, worker=NULL, lease_until=NULL, "
            "attempts=CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END "
            "WHERE id=? AND status='running' AND worker=?", (job_id, worker)).rowcount == 1)

    def succeed(self, worker: str, job_id: str, images: list[dict], nbytes: int) -> bool:
        """running -> succeeded with its images, once, by the worker holding it. False if it was cancelled
        meanwhile, or taken over by another worker."""
        unfetched = (1 << len(images)) - 1  # bit i: image i not yet handed to a client (retention)

        def confirm(run):
            row = run("SELECT status, worker FROM jobs WHERE id=?", (job_id,)).fetchone()
            return row is not None and tuple(row) == ("succeeded", worker)

        return self._retrying(lambda run: run(self._sql(
            "UPDATE jobs SET status='succeeded', finished={now}, images=?, bytes=?, unfetched=?, lease_until=NULL "
            "WHERE id=? AND status='running' AND worker=?"),
            (json.dumps(images), nbytes, unfetched, job_id, worker)).rowcount == 1, confirm)

    def fail(self, worker: str, job_id: str, error: dict) -> bool:
        """queued, or running held by `worker` -> failed."""
        def confirm(run):
            row = run("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
            return row is not None and row[0] == "failed"

        return self._retrying(lambda run: run(self._sql(
            "UPDATE jobs SET status='failed', finished={now}, error=?, lease_until=NULL "
            "WHERE id=? AND (status='queued' OR (status='running' AND worker=?))"),
            (json.dumps(error), job_id, worker)).rowcount == 1, confirm)

    def cancel(self, job_id: str) -> bool:
        """queued | running -> cancelled (whoever runs it). False if the job had already finished."""
        return self._once(lambda run: run(self._sql(
            f"UPDATE jobs SET status='cancelled', finished={{now}}, lease_until=NULL WHERE id=? AND {_LIVE}"),
            (job_id,)).rowcount == 1)

    # ---------------------------------------------------------------- multi-worker path
    def claim(self, worker: str, lease_s: float, limit: int = 1, key: str | None = None) -> list[JobRecord]:
        """Take up to `limit` queued jobs, oldest first, that can share one engine call: all of batch key `key`,
        or (None) of the oldest queued job's key. They become running, held by `worker` until the lease ends
        (`lease_s` seconds from now, on the database's clock) unless renewed. Two claimers never get the same job."""
        def go(run):
            ids = self._claim_ids(run, limit, key)
            if not ids:
                return []
            marks = ", ".join("?" * len(ids))
            rows = run(self._sql(
                f"UPDATE jobs SET status='running', started={{now}}, attempts=attempts+1, worker=?, "
                f"lease_until={{now}} + ? WHERE status='queued' AND id IN ({marks}) RETURNING {COLUMNS}"),
                (worker, float(lease_s), *ids)).fetchall()
            return sorted((record_from_row(r) for r in rows), key=lambda j: j.seq)

        return self._retrying(go)

    def renew(self, worker: str, job_ids: list[str], lease_s: float) -> list[str]:
        """Extend the leases of `job_ids` that `worker` still holds; returns those. A job missing from the answer
        was cancelled or taken over: the worker should stop it."""
        if not job_ids:
            return []
        marks = ", ".join("?" * len(job_ids))
        return self._retrying(lambda run: [r[0] for r in run(self._sql(
            f"UPDATE jobs SET lease_until={{now}} + ? WHERE status='running' AND worker=? AND id IN ({marks}) "
            f"RETURNING id"), (float(lease_s), worker, *job_ids)).fetchall()])

    def expire(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """Jobs whose lease ended (their worker stopped renewing: crashed, partitioned) go back to 'queued', or
        fail after `max_attempts` started runs. Returns (requeued ids, failed ids)."""
        expired = "status='running' AND lease_until IS NOT NULL AND lease_until < {now}"

        def go(run):
            failed = [r[0] for r in run(self._sql(
                f"UPDATE jobs SET status='failed', finished={{now}}, error=?, lease_until=NULL "
                f"WHERE {expired} AND attempts >= ? RETURNING id"),
                (json.dumps(interrupted_error(max_attempts)), max_attempts)).fetchall()]
            requeued = [r[0] for r in run(self._sql(
                f"UPDATE jobs SET status='queued', started=NULL, worker=NULL, lease_until=NULL WHERE {expired} "
                f"RETURNING id")).fetchall()]
            return requeued, failed

        return self._retrying(go)

    # ---------------------------------------------------------------- reads
    def get(self, job_id: str) -> JobRecord | None:
        row = self._once(lambda run: run(f"SELECT {COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone(), True)
        return record_from_row(row) if row else None

    def list(self, status: str | None, limit: int, oldest_first: bool) -> list[JobRecord]:
        order = "ASC" if oldest_first else "DESC"
        where, args = ("WHERE status=?", (status,)) if status else ("", ())
        rows = self._once(lambda run: run(f"SELECT {COLUMNS} FROM jobs {where} ORDER BY seq {order} LIMIT ?",
                                          (*args, limit)).fetchall(), True)
        return [record_from_row(r) for r in rows]

    # ---------------------------------------------------------------- retention
    def mark_fetched(self, job_id: str, index: int) -> None:
        """Image `index` of the job was handed to a client (served, or inlined in a response)."""
        keep = ((1 << 63) - 1) ^ (1 << index)  # clears bit `index` (no bitwise NOT: it types differently per SQL)
        self._once(lambda run: run(self._sql("UPDATE jobs SET unfetched = unfetched & ?, fetched={now} WHERE id=?"),
                                   (keep, job_id)))

    def total_bytes(self) -> int:
        return int(self._once(lambda run: run("SELECT COALESCE(SUM(bytes), 0) FROM jobs").fetchone()[0], True))

    def delete_expired(self, older_than_s: float, grace_s: float, limit: int) -> list[tuple[str, list[dict], int]]:
        """Delete up to `limit` removable jobs (see retention.py) last touched more than `older_than_s` ago;
        returns (id, images, bytes) of each."""
        return self._delete("COALESCE(fetched, finished) < {now} - ?", (float(max(older_than_s, grace_s)),), limit)

    def delete_oldest(self, grace_s: float, over_bytes: int, limit: int) -> list[tuple[str, list[dict], int]]:
        """Delete removable jobs, least recently touched first, until `over_bytes` of images are freed (or
        `limit` jobs were deleted)."""
        def pick(run):
            rows = run(self._sql(f"SELECT id, bytes FROM jobs WHERE {_REMOVABLE} AND bytes > 0 "
                                 f"AND COALESCE(fetched, finished) < {{now}} - ? "
                                 f"ORDER BY COALESCE(fetched, finished) ASC, seq ASC LIMIT ?"),
                       (float(grace_s), limit)).fetchall()
            ids, freed = [], 0
            for job_id, nbytes in rows:
                if freed >= over_bytes:
                    break
                ids.append(job_id)
                freed += nbytes
            return ids

        ids = self._once(pick, True)
        if not ids:
            return []
        marks = ", ".join("?" * len(ids))
        return self._delete(f"id IN ({marks})", tuple(ids), len(ids))

    def _delete(self, where: str, args: tuple, limit: int) -> list[tuple[str, list[dict], int]]:
        # Re-checked in the DELETE itself: a job fetched or changed since it was picked is not removed.
        rows = self._once(lambda run: run(self._sql(
            f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {_REMOVABLE} AND {where} "
            f"ORDER BY seq LIMIT ?) RETURNING id, images, bytes"), (*args, limit)).fetchall())
        return [(job_id, json.loads(images), int(nbytes)) for job_id, images, nbytes in rows]

    def unsized(self) -> list[tuple[str, list[dict]]]:
        """Succeeded jobs with images but no recorded size (written by a version that did not record it)."""
        rows = self._once(lambda run: run("SELECT id, images FROM jobs WHERE status='succeeded' AND bytes = 0 "
                                          "AND images <> '[]'").fetchall(), True)
        return [(job_id, json.loads(images)) for job_id, images in rows]

    def set_bytes(self, job_id: str, nbytes: int) -> None:
        self._once(lambda run: run("UPDATE jobs SET bytes=? WHERE id=?", (nbytes, job_id)))

    def input_digests(self) -> set[str]:
        """The sha256 of every input picture and mask that a job row names (params image_sha256 / mask_sha256)."""
        rows = self._once(lambda run: run("SELECT params FROM jobs WHERE params LIKE ?", ("%sha256%",)).fetchall(),
                          True)
        found: set[str] = set()
        for (params,) in rows:
            p = json.loads(params)
            found.update(d for d in (p.get("image_sha256"), p.get("mask_sha256")) if d)
        return found

    def existing(self, job_ids: list[str]) -> set[str]:
        """Which of `job_ids` have a row."""
        found: set[str] = set()
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            found.update(r[0] for r in self._once(lambda run: run(
                f"SELECT id FROM jobs WHERE id IN ({marks})", tuple(chunk)).fetchall(), True))
        return found


# Finished, and every image (if any) handed to a client at least once.
_REMOVABLE = "status IN ('succeeded', 'failed', 'cancelled') AND unfetched = 0"
