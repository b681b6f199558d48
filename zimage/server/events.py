"""Per-job events, from the worker thread to asyncio subscribers (SSE streams, waiting sync requests).

Event names: queued {position}, running {attempt}, progress {phase, step, total}, preview {image: data URL},
and one terminal event: succeeded {job}, failed {error}, cancelled {}. A subscriber that joins late first gets
the job's current state from the store (see app.py), then live events.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict

TERMINAL_EVENTS = ("succeeded", "failed", "cancelled")


class EventHub:
    def __init__(self):
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, set[asyncio.Queue]] = defaultdict(set)
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that owns the subscriber queues (set in the app's lifespan)."""
        self._loop = loop

    def subscribe(self, job_id: str) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue(maxsize=1000)
        with self._lock:
            self._subs[job_id].add(q)
        return q

    def unsubscribe(self, job_id: str, q: asyncio.Queue) -> None:
        with self._lock:
            subs = self._subs.get(job_id)
            if subs is not None:
                subs.discard(q)
                if not subs:
                    del self._subs[job_id]

    def has_subscribers(self, job_id: str) -> bool:
        with self._lock:
            return bool(self._subs.get(job_id))

    def publish(self, job_id: str, event: str, data: dict) -> None:
        """Thread-safe; never blocks the worker. A subscriber too slow to keep 1000 events loses progress events
        (never terminal ones: those are rare and the queue is far from full by then)."""
        loop = self._loop
        with self._lock:
            subs = list(self._subs.get(job_id, ()))
        if not subs or loop is None or loop.is_closed():
            return
        for q in subs:
            loop.call_soon_threadsafe(_put, q, (event, data))


def _put(q: asyncio.Queue, item) -> None:
    try:
        q.put_nowait(item)
    except asyncio.QueueFull:
        pass


def format_sse(event: str, data: dict) -> str:
    """One server-sent event: `event: <name>` and a one-line JSON `data:` (JSON never contains a raw newline)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
