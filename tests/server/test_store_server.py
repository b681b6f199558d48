"""The server on the store's other configurations: PostgreSQL, images at an fsspec URL, retention from the
settings, and a database that goes away (503, then back to normal with nothing lost)."""

import base64
import time

from tests.pg_cluster import pg_admin_url, pg_cluster, pg_url  # noqa: F401 - fixtures
from zimage.server.store.retention import Retention

BODY = {"prompt": "a red fox", "size": "256x256", "num_inference_steps": 2, "seed": 5}


def wait_done(client, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return job


def test_postgres_and_images_at_an_fsspec_url(make_client, pg_url):
    client = make_client(database_url=pg_url, images_url="memory://zimage-server-test/images")
    job = client.post("/v1/jobs", json=BODY).json()
    done = wait_done(client, job["id"])
    assert done["status"] == "succeeded"
    image = client.get(done["images"][0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(b"\x89PNG")
    inline = client.post("/v1/images/generations", json={**BODY, "response_format": "b64_json"}).json()
    assert base64.b64decode(inline["data"][0]["b64_json"]) == image.content  # same seed, same image
    assert client.get("/v1/images/job_" + "0" * 24 + "-0.png").status_code == 404


def test_retention_from_the_settings_removes_fetched_jobs(make_client):
    client = make_client(retention_age_s=0.5)
    store = client.app.state.zimage.store
    assert store._retention is not None
    kept = client.post("/v1/jobs", json=BODY).json()["id"]
    fetched = client.post("/v1/jobs", json={**BODY, "seed": 6}).json()["id"]
    for job_id in (kept, fetched):
        wait_done(client, job_id)
    assert client.get(wait_done(client, fetched)["images"][0]["url"]).status_code == 200
    report = store.sweep(Retention(max_age_s=0.0, grace_s=0.0))  # now, rather than waiting for the thread
    assert report["jobs"] == 1
    assert client.get(f"/v1/jobs/{fetched}").status_code == 404 and client.get(f"/v1/jobs/{kept}").status_code == 200


def test_a_database_that_goes_away_is_503_then_nothing_is_lost(make_client, pg_cluster):
    client = make_client(database_url=pg_cluster.url)
    before = wait_done(client, client.post("/v1/jobs", json=BODY).json()["id"])
    pg_cluster.stop("immediate")
    try:
        r = client.post("/v1/jobs", json=BODY)
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "store_unavailable" and "Traceback" not in r.text
        assert client.get(f"/v1/jobs/{before['id']}").status_code == 503
    finally:
        pg_cluster.start()
    again = client.get(f"/v1/jobs/{before['id']}").json()
    assert again["status"] == "succeeded" and again["finished"] == before["finished"]
    assert wait_done(client, client.post("/v1/jobs", json=BODY).json()["id"])["status"] == "succeeded"
