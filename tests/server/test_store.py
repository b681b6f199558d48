"""The job store, the same suite against both backends (SQLite, PostgreSQL): accepted = durable, the state
machine, the single-worker path (start/recover), leases for several workers (claim/renew/expire), fencing (a job
completes once, by its holder), image files (local and fsspec), crash leftovers, retention."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from tests.pg_cluster import pg_admin_url, pg_cluster, pg_url  # noqa: F401 - fixtures
from zimage.server.jobs import JobStore, StoreUnavailable
from zimage.server.store.retention import Retention, parse_retention, sweep


def params(i=0, size=256, steps=2, n=1):
    return {"prompt": f"p{i}", "negative_prompt": "", "width": size, "height": size, "steps": steps,
            "guidance": 0.0, "seed": i, "n": n, "output_format": "png", "output_compression": None}


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """The database location of one backend (a fresh one per test)."""
    if request.param == "sqlite":
        return tmp_path / "jobs.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def open_store(db, tmp_path):
    opened = []

    def make(**kw):
        kw.setdefault("images", tmp_path / "images")
        store = JobStore(db, **kw)
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store):
    return open_store()


def finish(store, job, worker=None, data=b"png bytes"):
    """Write the job's images and mark it succeeded (as the server's worker does)."""
    images = []
    for i in range(job.params["n"]):
        name = store.image_name(job.id, i, "png")
        store.write_image(name, data)
        images.append({"id": name, "index": i, "seed": job.params["seed"] + i})
    return store.succeed(job.id, images, worker=worker)


# ---------------------------------------------------------------- accepted = durable, the state machine
def test_an_added_job_is_visible_to_another_connection_at_once(open_store):
    a, b = open_store(), open_store()
    job = a.add(params(1))
    seen = b.get(job.id)
    assert seen.status == "queued" and seen.params == params(1) and seen.seq == job.seq
    assert [j.id for j in b.list(status="queued")] == [job.id]


def test_transitions_happen_once(store):
    job = store.add(params())
    assert store.start([job.id]) == [job.id]
    assert store.start([job.id]) == []  # already running
    assert finish(store, job)
    assert not finish(store, job)  # never twice
    assert not store.cancel(job.id) and not store.fail(job.id, {"message": "x"})
    done = store.get(job.id)
    assert done.status == "succeeded" and done.attempts == 1 and len(done.images) == 1 and done.bytes == 9
    assert done.finished >= done.started >= done.created


def test_cancel_wins_over_a_running_job(store):
    job = store.add(params())
    store.start([job.id])
    assert store.cancel(job.id)
    assert not finish(store, job)
    assert store.get(job.id).status == "cancelled"


def test_requeue_does_not_count_the_interrupted_run(store):
    job = store.add(params())
    store.start([job.id])
    assert store.requeue(job.id)
    again = store.get(job.id)
    assert again.status == "queued" and again.attempts == 0 and again.started is None


def test_list_orders_and_filters(store):
    jobs = [store.add(params(i)) for i in range(4)]
    store.start([jobs[1].id])
    assert [j.id for j in store.list()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in store.list(status="queued", oldest_first=True)] == [jobs[0].id, jobs[2].id, jobs[3].id]
    assert len(store.list(limit=2)) == 2
    assert store.get("job_" + "0" * 24) is None and store.get("../etc/passwd") is None


# ---------------------------------------------------------------- single worker: recover after a crash
def test_recover_requeues_what_a_crash_left_running_and_fails_it_after_max_attempts(open_store):
    first = open_store()
    again, worn, done = first.add(params(1)), first.add(params(2)), first.add(params(3))
    first.start([again.id, worn.id, done.id])
    assert finish(first, done)
    for _ in range(2):  # `worn` interrupted twice more
        second = open_store()
        second.recover(max_attempts=3)
        second.start([worn.id])
    third = open_store()  # the process restarts: a new worker id
    queued, failed = third.recover(max_attempts=3)
    assert [j.id for j in queued] == [again.id] and failed == [worn.id]
    assert third.get(again.id).attempts == 1 and third.get(again.id).status == "queued"
    assert third.get(worn.id).status == "failed" and third.get(worn.id).error["code"] == "interrupted"
    assert third.get(done.id).status == "succeeded"  # finished jobs are never touched again


def test_a_recovered_job_cannot_be_finished_by_the_process_that_lost_it(open_store):
    """Two incarnations overlapping (a rolling restart): the old one's late results and its shutdown requeue are
    refused; the job completes once, by the new one."""
    old = open_store()
    job = old.add(params())
    old.start([job.id])
    new = open_store()
    new.recover(max_attempts=3)
    assert new.start([job.id]) == [job.id]
    assert not old.requeue(job.id)  # old one shutting down
    assert not finish(old, job)
    assert finish(new, job)
    assert new.get(job.id).status == "succeeded" and new.get(job.id).attempts == 2


# ---------------------------------------------------------------- several workers: claims and leases
def test_claim_takes_the_oldest_key_and_its_companions(store):
    a = store.add(params(0, size=256))
    b = store.add(params(1, size=512))
    c = store.add(params(2, size=256))
    got = store.claim("w1", lease_s=30, limit=8)
    assert [j.id for j in got] == [a.id, c.id]
    assert all(j.status == "running" and j.worker == "w1" and j.attempts == 1 and j.lease_until for j in got)
    assert store.claim("w2", lease_s=30, limit=8, key="256x256:2:0.0") == []
    assert [j.id for j in store.claim("w2", lease_s=30, limit=8)] == [b.id]
    assert store.claim("w3", lease_s=30) == []


def test_concurrent_claimers_never_share_a_job(open_store):
    seed = open_store()
    ids = {seed.add(params(i, size=256 + 16 * (i % 3))).id for i in range(60)}
    claimed: dict[str, list] = {}

    def claimer(name):
        store = open_store()  # a connection of its own, like another replica
        while got := store.claim(name, lease_s=30, limit=4):
            claimed.setdefault(name, []).extend(j.id for j in got)
            for j in got:
                assert finish(store, j, worker=name)

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [i for got in claimed.values() for i in got]
    assert sorted(everything) == sorted(ids)  # each job once, none missed
    assert all(j.status == "succeeded" and j.attempts == 1 for j in seed.list())


def test_an_expired_lease_is_run_again_and_completes_once(store):
    job = store.add(params())
    [held] = store.claim("crashed", lease_s=0.3)
    assert store.expire(max_attempts=3) == ([], [])  # still leased
    time.sleep(0.5)
    assert store.expire(max_attempts=3) == ([job.id], [])
    [again] = store.claim("survivor", lease_s=30)
    assert again.id == job.id and again.attempts == 2
    assert not finish(store, held, worker="crashed")  # a zombie cannot complete it
    assert finish(store, again, worker="survivor")
    assert store.get(job.id).status == "succeeded" and store.get(job.id).worker == "survivor"


def test_a_job_whose_leases_keep_expiring_fails_after_max_attempts(store):
    job = store.add(params())
    for attempt in (1, 2):
        store.claim(f"w{attempt}", lease_s=0.1)
        time.sleep(0.25)
        requeued, failed = store.expire(max_attempts=2)
        assert (requeued, failed) == (([job.id], []) if attempt == 1 else ([], [job.id]))
    assert store.get(job.id).status == "failed" and store.get(job.id).error["code"] == "interrupted"


def test_renew_keeps_a_lease_and_reports_lost_jobs(store):
    kept, cancelled = store.add(params(1)), store.add(params(2))
    store.claim("w", lease_s=0.4, limit=2)
    store.cancel(cancelled.id)
    for _ in range(4):
        time.sleep(0.2)
        assert store.renew("w", [kept.id, cancelled.id], lease_s=0.4) == [kept.id]
    assert store.expire(max_attempts=3) == ([], [])  # renewed: not expired after 0.8 s
    assert store.renew("other", [kept.id], lease_s=5) == []


def test_recover_leaves_live_leases_alone(store):
    leased = store.add(params(1))
    store.claim("replica", lease_s=30)
    mine = store.add(params(2))
    store.start([mine.id])
    queued, failed = store.recover(max_attempts=3)
    assert [j.id for j in queued] == [mine.id] and not failed
    assert store.get(leased.id).status == "running"


CLAIM_AND_HANG = """
import sys, time
from zimage.server.jobs import JobStore
store = JobStore(sys.argv[1], sys.argv[2])
[job] = store.claim("doomed", lease_s=1.0)
print(job.id, flush=True)
while True:  # renews, like a live worker, until killed
    store.renew("doomed", [job.id], lease_s=1.0)
    time.sleep(0.2)
"""


def test_a_claimer_killed_9_loses_its_job_to_another(db, tmp_path, store):
    job = store.add(params())
    proc = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, str(db), str(tmp_path / "images")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == job.id
        time.sleep(1.5)  # it keeps renewing: nothing expires
        assert store.expire(max_attempts=3) == ([], [])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while store.expire(max_attempts=3)[0] != [job.id]:
        assert time.monotonic() < deadline, "the dead claimer's lease never expired"
        time.sleep(0.1)
    [again] = store.claim("survivor", lease_s=30)
    assert finish(store, again, worker="survivor")
    assert store.get(job.id).attempts == 2


# ---------------------------------------------------------------- image files
def test_images_are_served_only_for_succeeded_jobs_that_list_them(store, tmp_path):
    job = store.add(params(n=2))
    store.start([job.id])
    name = store.image_name(job.id, 0, "png")
    store.write_image(name, b"early")
    assert store.image_path(name) is None and store.read_image(name) is None  # not succeeded yet
    assert finish(store, job)
    assert store.image_path(name).read_bytes() == b"png bytes" and store.read_image(name) == b"png bytes"
    for bad in ("../jobs.db", f"{job.id}-5.png", f"{job.id}-0.jpeg", "x.png", ""):
        assert store.image_path(bad) is None and store.read_image(bad) is None
    (tmp_path / "images" / "job_aaaaaaaaaaaaaaaaaaaaaaaa-0.png").write_bytes(b"planted")
    assert store.read_image("job_aaaaaaaaaaaaaaaaaaaaaaaa-0.png") is None  # no such job
    assert not [p for p in (tmp_path / "images").iterdir() if p.name.endswith(".part")]


def test_images_at_an_fsspec_url(open_store):
    store = open_store(images="memory://zimage-test/images")
    assert store.images_dir is None and store.images_url == "memory://zimage-test/images"
    job = store.add(params())
    store.start([job.id])
    assert finish(store, job, data=b"remote")
    name = store.get(job.id).images[0]["id"]
    assert store.image_path(name) is None  # not a local file: the route reads the bytes instead
    assert store.read_image(name) == b"remote"
    assert store.get(job.id).bytes == 6 and store.get(job.id).unfetched == 0


WRITE_FOREVER = """
import sys
from zimage.server.jobs import JobStore
store = JobStore(sys.argv[1], sys.argv[2])
data = bytes(64 << 20)
i = 0
while True:
    store.write_image(f"job_{i:024x}-0.png", data)
    i += 1
"""


def test_kill_9_while_writing_leaves_no_part_file_after_the_restart(db, tmp_path, open_store):
    images = tmp_path / "images"
    proc = subprocess.Popen([sys.executable, "-c", WRITE_FOREVER, str(db), str(images)])
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".part") for p in images.glob(".*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never got going"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p for p in images.iterdir() if p.name.endswith(".part")], "the kill did not land mid-write"
    open_store()
    assert not [p for p in images.iterdir() if p.name.endswith(".part")]


def test_part_files_of_live_writers_are_left_alone(tmp_path, open_store):
    images = tmp_path / "images"
    images.mkdir()
    host = os.uname().nodename.replace(".", "_")
    live = images / f".job_{'1' * 24}-0.png.{host}.{os.getppid()}.abcd.part"  # our parent runs: a live writer
    other_host_new = images / f".job_{'2' * 24}-0.png.elsewhere.123.abcd.part"
    other_host_old = images / f".job_{'3' * 24}-0.png.elsewhere.124.abcd.part"
    for p in (live, other_host_new, other_host_old):
        p.write_bytes(b"x")
    os.utime(other_host_old, (time.time() - 7200, time.time() - 7200))
    open_store()
    assert live.exists() and other_host_new.exists() and not other_host_old.exists()


# ---------------------------------------------------------------- retention
def test_parse_retention():
    assert parse_retention("7d") == Retention(max_age_s=7 * 86400)
    assert parse_retention("20GB") == Retention(max_bytes=20 * 10**9)
    assert parse_retention("12h, 1.5GiB") == Retention(max_age_s=43200, max_bytes=int(1.5 * 2**30))
    for bad in ("", "7", "7x", "7d,8d", "0d", "-1d", "d"):
        with pytest.raises(ValueError):
            parse_retention(bad)


def fetched_job(store, i, data=b"12345"):
    job = store.add(params(i))
    store.start([job.id])
    finish(store, job, data=data)
    assert store.read_image(store.get(job.id).images[0]["id"]) == data
    return job


def test_retention_by_age_never_removes_an_unfetched_or_unfinished_job(store, tmp_path):
    old_fetched = fetched_job(store, 1)
    unfetched = store.add(params(2))
    store.start([unfetched.id])
    finish(store, unfetched)
    failed = store.add(params(3))
    store.fail(failed.id, {"message": "x", "type": "server_error", "code": "x"})
    running = store.add(params(4))
    store.start([running.id])
    queued = store.add(params(5))
    time.sleep(0.4)
    young = fetched_job(store, 6)
    result = sweep(store, Retention(max_age_s=0.3, grace_s=0))
    assert result["jobs"] == 2 and result["bytes"] == 5
    assert store.get(old_fetched.id) is None and store.get(failed.id) is None
    for kept in (unfetched, running, queued, young):
        assert store.get(kept.id) is not None
    names = {p.name for p in (tmp_path / "images").iterdir()}
    assert f"{old_fetched.id}-0.png" not in names and f"{unfetched.id}-0.png" in names


def test_a_job_is_removable_only_once_every_image_was_fetched(store):
    job = store.add(params(n=2))
    store.start([job.id])
    finish(store, job)
    first = store.get(job.id).images[0]["id"]
    store.read_image(first)
    store.read_image(first)  # fetching one image twice is not fetching both
    time.sleep(0.2)
    assert sweep(store, Retention(max_age_s=0.1, grace_s=0))["jobs"] == 0
    assert store.image_path(store.get(job.id).images[1]["id"]) is not None
    time.sleep(0.2)
    assert sweep(store, Retention(max_age_s=0.1, grace_s=0))["jobs"] == 1


def test_retention_by_bytes_removes_least_recently_fetched_first(store):
    jobs = [fetched_job(store, i, data=b"x" * 100) for i in range(4)]
    store.read_image(store.get(jobs[0].id).images[0]["id"])  # job 0 used again: now the most recent
    unfetched = store.add(params(9))
    store.start([unfetched.id])
    finish(store, unfetched, data=b"y" * 100)
    result = sweep(store, Retention(max_bytes=250, grace_s=0))
    assert result["jobs"] == 3 and result["bytes"] == 300  # 500 -> 200: jobs 1, 2, 3 go
    assert {j.id for j in store.list()} == {jobs[0].id, unfetched.id}
    assert sweep(store, Retention(max_bytes=50, grace_s=0))["unfetched_bytes_over"] == 50  # only job 0 could go


def test_retention_removes_an_input_picture_once_no_job_names_it(store, tmp_path):
    """Input pictures (one file per digest, shared by every job with that picture) go with the last job naming
    them; a fresh one (a job about to be committed writes its file first) and one a live job names stay."""
    import hashlib
    import os

    from zimage.server.inputs import input_name

    digest = {k: hashlib.sha256(k.encode()).hexdigest() for k in ("shared", "mask", "fresh")}
    for k, d in digest.items():
        store.files.write(input_name(d), k.encode())
    pic = {"image_sha256": digest["shared"], "strength": 0.6}
    old = store.add({**params(1), **pic, "mask_sha256": digest["mask"]})
    store.start([old.id])
    finish(store, old)
    store.read_image(store.get(old.id).images[0]["id"])
    live = store.add({**params(2), **pic})  # queued: keeps the shared picture
    folder = tmp_path / "images"
    for k in ("shared", "mask"):
        os.utime(folder / input_name(digest[k]), (time.time() - 120, time.time() - 120))
    time.sleep(0.3)
    result = sweep(store, Retention(max_age_s=0.2, grace_s=60))
    assert result["jobs"] == 0  # the finished job was fetched within the grace period: it stays, and its files
    os.utime(folder / input_name(digest["fresh"]), (time.time() - 120, time.time() - 120))
    store.files.write(input_name(digest["fresh"]), b"fresh")  # written again just now: within the grace period
    result = sweep(store, Retention(max_age_s=0.2, grace_s=0.1))
    names = {p.name for p in folder.iterdir()}
    assert result["jobs"] == 1 and store.get(old.id) is None and store.get(live.id) is not None
    assert input_name(digest["shared"]) in names  # the queued job still names it
    assert input_name(digest["mask"]) not in names and result["inputs"] == 1  # only the deleted job named it
    assert input_name(digest["fresh"]) in names  # no row names it yet, but it was written within grace_s


def test_nothing_used_within_the_grace_period_is_removed(store):
    fetched_job(store, 1)
    assert sweep(store, Retention(max_bytes=1, grace_s=60))["jobs"] == 0
    assert sweep(store, Retention(max_age_s=0.001, grace_s=60))["jobs"] == 0


def test_retention_runs_in_the_background_and_removes_orphans_at_start(open_store, tmp_path):
    first = open_store()
    job = fetched_job(first, 1)
    orphan = tmp_path / "images" / f"job_{'f' * 24}-0.png"
    orphan.write_bytes(b"left by a crash between a row's deletion and its file's")
    store = open_store(retention=Retention(max_age_s=0.2, interval_s=0.1, grace_s=0))
    assert not orphan.exists()
    deadline = time.monotonic() + 10
    image = tmp_path / "images" / f"{job.id}-0.png"
    while store.get(job.id) is not None or image.exists():  # the row goes first, then its files
        assert time.monotonic() < deadline, "the background sweep never removed the job and its image"
        time.sleep(0.05)


# ---------------------------------------------------------------- backend specifics
def test_sqlite_database_of_the_previous_version_is_upgraded(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE jobs (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, status TEXT NOT NULL, params TEXT NOT NULL,
            created REAL NOT NULL, started REAL, finished REAL, attempts INTEGER NOT NULL DEFAULT 0,
            images TEXT NOT NULL DEFAULT '[]', error TEXT);
        CREATE INDEX jobs_status ON jobs (status, seq);""")
    old.execute("INSERT INTO jobs (id, seq, status, params, created) VALUES (?, 1, 'queued', ?, 1.0)",
                ("job_" + "a" * 24, json.dumps(params(3, size=512))))
    old.commit()
    old.close()
    store = JobStore(path, tmp_path / "images")
    try:
        [job] = store.claim("w", lease_s=5, key="512x512:2:0.0")  # its batch key was filled in
        assert job.id == "job_" + "a" * 24 and job.params["seed"] == 3
        assert store.add(params()).seq == 2
    finally:
        store.close()


def test_postgres_restart_answers_unavailable_then_recovers_losing_nothing(pg_cluster, tmp_path):
    store = JobStore(pg_cluster.url, tmp_path / "images")
    store.db.retry_s = 30
    try:
        accepted = [store.add(params(i)).id for i in range(3)]
        store.start([accepted[0]])
        pg_cluster.stop("immediate")  # a crash of the database, not a polite shutdown
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:
            store.add(params(9))
        assert time.monotonic() - t0 < 30 and "password" not in str(err.value)
        with pytest.raises(StoreUnavailable):
            store.get(accepted[1])
        outcome = {}
        waiting = threading.Thread(target=lambda: outcome.update(ok=finish(store, store_job(accepted[0]))))
        waiting.start()  # a worker's transition waits the outage out
        time.sleep(1.0)
        pg_cluster.start()
        waiting.join(40)
        assert outcome == {"ok": True}
        assert store.get(accepted[0]).status == "succeeded"
        assert [j.id for j in store.list(status="queued", oldest_first=True)] == accepted[1:]
        assert store.add(params(10)).status == "queued"
    finally:
        store.close()


def store_job(job_id):
    """A stand-in record for finish(): only id and params are used."""
    from zimage.server.jobs import JobRecord

    return JobRecord(job_id, 0, "running", params(), 0.0)


def test_an_unreachable_postgres_is_a_clear_error(tmp_path):
    pytest.importorskip("psycopg")
    with pytest.raises(StoreUnavailable) as err:
        JobStore("postgresql://zimage:secret-pw@127.0.0.1:1/jobs", tmp_path / "images")
    assert "127.0.0.1:1/jobs" in str(err.value) and "secret-pw" not in str(err.value)
