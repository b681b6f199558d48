"""Retention: removing old jobs and their images so the data does not grow without bound.

The rule (docs/server.md, "Retention"):
- Only a *removable* job is ever deleted: finished (succeeded, failed or cancelled), and, if it has images, every
  one of them handed to a client at least once (GET /v1/images/..., or inlined in a b64_json response). A job
  whose images nobody has fetched yet is kept, whatever its age and whatever the byte budget.
- A job is deleted with its images (GET /v1/jobs/{id} then answers 404), never an image alone.
- Age counts from a job's last use: the last time one of its images was handed out, or when it finished if it has
  none. `--retention 7d` deletes removable jobs unused for 7 days.
- Bytes: `--retention 20GB` keeps the images' total under 20 GB by deleting removable jobs, least recently used
  first. Images not yet fetched count in the total but are not deleted, so the total can stay above the budget
  while they wait (the log says so).
- Nothing used in the last GRACE_S is deleted, even over the budget: a client that was just handed an image or
  its URL may come back for it, and a file being served must not vanish mid-response.
Sweeps run on a background thread every `interval_s`, and once at start.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

log = logging.getLogger("zimage.server")

GRACE_S = 600.0
BATCH = 500  # jobs deleted per statement (a sweep loops until nothing is left to delete)

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PART = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")


@dataclass(frozen=True)
class Retention:
    max_age_s: float | None = None  # delete removable jobs unused for this long
    max_bytes: int | None = None  # keep the images' total under this (removable jobs, least recently used first)
    interval_s: float = 60.0  # between sweeps
    grace_s: float = GRACE_S  # nothing used this recently is deleted

    def __post_init__(self):
        if self.max_age_s is None and self.max_bytes is None:
            raise ValueError("a retention policy needs an age, a size, or both")


def parse_retention(text: str) -> Retention:
    """'7d', '20GB', '7d,20GB' (units: s m h d w; B KB MB GB TB KiB MiB GiB TiB). Raises ValueError naming the part
    it could not read."""
    age = size = None
    for part in filter(None, (p.strip() for p in text.lower().split(","))):
        m = _PART.match(part)
        if not m:
            raise ValueError(f"cannot read {part!r}: give an age like 7d or 12h, a size like 20GB, or both: 7d,20GB")
        value, unit = float(m.group(1)), m.group(2)
        if unit in _AGE_UNITS and age is None:
            age = value * _AGE_UNITS[unit]
        elif unit in _SIZE_UNITS and size is None:
            size = int(value * _SIZE_UNITS[unit])
        else:
            raise ValueError(f"cannot read {part!r}: units are s m h d w (age) and B KB MB GB TB KiB MiB GiB TiB "
                             f"(size), each given at most once")
        if value <= 0:
            raise ValueError(f"{part!r}: must be more than 0")
    if age is None and size is None:
        raise ValueError("give an age like 7d, a size like 20GB, or both: 7d,20GB")
    return Retention(max_age_s=age, max_bytes=size)


def sweep(store, policy: Retention) -> dict:
    """One pass: deletes what the policy allows, returns {"jobs", "bytes", "unfetched_bytes_over"}."""
    deleted_jobs = freed = 0

    def remove(rows):
        nonlocal deleted_jobs, freed
        for _, images, nbytes in rows:  # rows first, then files: a crash between leaves orphans (remove_orphans)
            store.files.delete([i["id"] for i in images])
            freed += nbytes
        deleted_jobs += len(rows)

    if policy.max_age_s is not None:
        while rows := store.db.delete_expired(policy.max_age_s, policy.grace_s, BATCH):
            remove(rows)
    over = 0
    if policy.max_bytes is not None:
        while (over := store.db.total_bytes() - policy.max_bytes) > 0:
            rows = store.db.delete_oldest(policy.grace_s, over, BATCH)
            if not rows:
                break
            remove(rows)
        if over > 0:
            log.warning("retention: images total %d bytes over the %d-byte budget; the rest are not fetched yet "
                        "or were used in the last %.0f s", over, policy.max_bytes, policy.grace_s)
    inputs = remove_unused_inputs(store, policy.grace_s)  # (every sweep: also those a crash left behind)
    if deleted_jobs or inputs:
        log.info("retention: deleted %d job(s), %d bytes of images, %d input picture(s)", deleted_jobs, freed, inputs)
    return {"jobs": deleted_jobs, "bytes": freed, "inputs": inputs, "unfetched_bytes_over": max(0, over)}


def remove_unused_inputs(store, grace_s: float) -> int:
    """Input pictures (`input-<sha256>`, zimage/server/inputs.py) that no job row names any more. One file serves
    every job with the same picture, so a file goes only when the last such job is deleted; a file written in the
    last `grace_s` seconds stays (a job that uploads the same picture now writes its file before its row exists)."""
    from zimage.server.inputs import INPUT_NAME

    names = [n for n in store.files.names() if INPUT_NAME.match(n)]
    if not names:
        return 0
    named = store.db.input_digests()
    unused = [n for n in names if n.removeprefix("input-") not in named]
    old = [n for n in unused if (age := store.files.age_s(n)) is not None and age > grace_s]
    return store.files.delete(old)


def remove_orphans(store) -> int:
    """Image files that no job lists any more (a crash between deleting a job's row and its files). Run at start
    when retention is on: without retention no row is ever deleted, so no file can be an orphan."""
    from zimage.server.store.model import IMAGE_NAME

    by_job: dict[str, list[str]] = {}
    for name in store.files.names():
        m = IMAGE_NAME.match(name)
        if m:
            by_job.setdefault(m.group(1), []).append(name)
    if not by_job:
        return 0
    alive = store.db.existing(list(by_job))
    removed = store.files.delete([n for job_id, names in by_job.items() if job_id not in alive for n in names])
    if removed:
        log.info("retention: removed %d image file(s) of deleted jobs", removed)
    return removed


class RetentionThread:
    """Sweeps in the background; errors are logged and the next sweep tries again."""

    def __init__(self, store, policy: Retention):
        self.store, self.policy = store, policy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="zimage-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _main(self) -> None:
        while True:
            try:
                sweep(self.store, self.policy)
            except Exception:  # noqa: BLE001 - e.g. the database is restarting: the next sweep retries
                log.exception("retention sweep failed")
            if self._stop.wait(self.policy.interval_s):
                return
