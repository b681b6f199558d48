"""PostgreSQL backend (psycopg 3): a cluster. Every replica and the ingress share one database.

A pool of connections (psycopg_pool), each checked on checkout, so a database restart costs the calls made while
it is down (StoreUnavailable: the HTTP layer answers 503) and nothing after. Claims lock the rows they take with
FOR UPDATE SKIP LOCKED: concurrent claimers pass over each other's rows instead of waiting or taking them twice.
The clock is the database's (clock_timestamp), so leases mean the same to every machine whatever their clocks.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from zimage.server.store.model import StoreUnavailable
from zimage.server.store.sql import SqlJobs

log = logging.getLogger("zimage.server")

CONNECT_TIMEOUT_S = 5  # a new connection gives up after this (the database is down or unreachable)
# A call waits this long for a pooled connection before StoreUnavailable: a client waiting on a database that is
# down hears 503 after this; a worker's transition retries (SqlJobs._retrying).
CHECKOUT_TIMEOUT_S = 3
_LOCK_ID = 0x7A696D616765  # pg_advisory_xact_lock key ("zimage"): one process at a time creates the schema

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        seq BIGINT GENERATED ALWAYS AS IDENTITY,  -- submission order
        status TEXT NOT NULL,
        params TEXT NOT NULL,                     -- JSON: schemas.JobParams (size resolved, seed drawn)
        batch_key TEXT NOT NULL,                  -- model.batch_key(params): jobs that can share an engine call
        created DOUBLE PRECISION NOT NULL, started DOUBLE PRECISION, finished DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        images TEXT NOT NULL DEFAULT '[]',        -- JSON list of {"id", "index", "seed"}
        error TEXT,                               -- JSON {"message", "type", "code"} when failed
        worker TEXT,                              -- who holds (or last held) the job
        lease_until DOUBLE PRECISION,             -- claim path: end of the lease; NULL on the single-worker path
        bytes BIGINT NOT NULL DEFAULT 0,          -- size of its image files
        unfetched BIGINT NOT NULL DEFAULT 0,      -- bit i: image i not yet handed to a client
        fetched DOUBLE PRECISION                  -- last time one of its images was handed out
    )""",
    "CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq)",
    "CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, batch_key, seq)",
]


class PostgresJobs(SqlJobs):
    NOW = "EXTRACT(EPOCH FROM clock_timestamp())::double precision"

    def __init__(self, url: str, max_connections: int = 8):
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
        from psycopg_pool import ConnectionPool

        self._errors = (psycopg.OperationalError, psycopg.InterfaceError)
        info = conninfo_to_dict(url)
        # Never the password: this goes into logs and error messages.
        self.describe = (f"postgresql {info.get('user', '')}@{info.get('host', 'localhost')}:"
                         f"{info.get('port', 5432)}/{info.get('dbname', '')}")
        try:  # one plain connection first: a wrong URL or a database that is down fails now, with its cause
            psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S).close()
        except psycopg.Error as e:
            raise StoreUnavailable(f"cannot reach the job database ({self.describe}): {_reason(e)}") from e
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, timeout=CHECKOUT_TIMEOUT_S,
                                    kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
                                    check=ConnectionPool.check_connection, open=False, name="zimage-jobs")
        self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        with self._transaction() as run:
            run("SELECT pg_advisory_xact_lock(%s)" % _LOCK_ID)
            for statement in _SCHEMA:
                run(statement)

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _transaction(self, readonly: bool = False):
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn, conn.transaction():
                yield lambda sql, args=(): conn.execute(sql.replace("?", "%s"), args)
        except (PoolTimeout, *self._errors) as e:
            log.warning("job database %s: %s", self.describe, e)
            raise StoreUnavailable(f"the job database is unavailable ({self.describe})") from e

    def _insert(self, run, job_id: str, params: str, key: str) -> tuple[int, float]:
        return tuple(run(f"INSERT INTO jobs (id, status, params, batch_key, created) "
                         f"VALUES (?, 'queued', ?, ?, {self.NOW}) RETURNING seq, created",
                         (job_id, params, key)).fetchone())

    def _claim_ids(self, run, limit: int, key: str | None) -> list[str]:
        # SKIP LOCKED: rows another claimer is taking right now are passed over, not waited for.
        if key is None:
            head = run("SELECT batch_key FROM jobs WHERE status='queued' ORDER BY seq LIMIT 1 "
                       "FOR UPDATE SKIP LOCKED").fetchone()
            if head is None:
                return []
            key = head[0]
        return [r[0] for r in run("SELECT id FROM jobs WHERE status='queued' AND batch_key=? ORDER BY seq LIMIT ? "
                                  "FOR UPDATE SKIP LOCKED", (key, limit)).fetchall()]


def _reason(error) -> str:
    """The first line of libpq's message (e.g. 'Connection refused', 'password authentication failed for user
    "x"'): it names hosts and users, never a password."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
