"""A local Ray cluster for the deploy tests (one per session), and the zimage application deployed on it with two
engine replicas of the tiny model, one torch thread each: once per job-store backend (SQLite, PostgreSQL)."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pg_cluster import create_schema, drop_schema, pg_admin_url  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2


@pytest.fixture(scope="session")
def ray_serve(zimage_cache_dir):
    """The Serve proxy's URL. Workers import this checkout (PYTHONPATH) and find tiny-random in the session's
    cache; the cluster's files live in a private short path (Ray's sockets must fit in 107 characters)."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from zimage.server.launch import free_port

    temp = tempfile.mkdtemp(prefix="zray-")
    env = {"PYTHONPATH": str(ROOT), "ZIMAGE_CACHE": str(zimage_cache_dir), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, _temp_dir=temp,
             log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@dataclass
class Deployed:
    url: str
    backend: str
    data_dir: Path

    def engine_handle(self):
        from ray import serve

        return serve.get_deployment_handle("ZImageEngine", app_name="zimage")


def deploy_args(data_dir, **extra) -> dict:
    return {"model": "tiny-random", "device": "cpu", "replicas": 2, "torch_threads": 1, "max_batch": 4,
            "max_ongoing_requests": 2, "batch_wait": "1.0", "data_dir": str(data_dir), "warmup_size": "256x256",
            "default_size": "256x256", "default_steps": str(STEPS), **extra}


def wait_healthy(url: str, timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def deployed(request, ray_serve, tmp_path_factory):
    from ray import serve

    from zimage.deploy.ray_app import APP_NAME, app

    data_dir = tmp_path_factory.mktemp(f"ray-{request.param}")
    extra, schema = {}, None
    if request.param == "postgres":
        admin = request.getfixturevalue("pg_admin_url")
        schema, extra["database_url"] = create_schema(admin)
    serve.run(app(deploy_args(data_dir, **extra)), name=APP_NAME, route_prefix="/", blocking=False)
    wait_healthy(ray_serve)
    yield Deployed(ray_serve, request.param, data_dir)
    serve.delete(APP_NAME)
    if schema:
        drop_schema(admin, schema)
