"""`zimage serve --ray`: the same server on Ray Serve, on a local Ray cluster started here or on one joined with
--ray-address. Blocks until interrupted; then the application is removed (as `serve run` does)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from zimage.deploy.config import EngineDeployment, engine_of
from zimage.errors import UsageError

log = logging.getLogger("zimage.deploy")

# Seconds between the main thread's wake-ups while it serves: how late a Ctrl-C may be seen (wait_until_interrupted).
POLL_S = 1.0


def worker_pythonpath(environ=os.environ) -> str:
    """PYTHONPATH for a local cluster's workers: the zimage this process runs (a checkout, a virtualenv) first, so
    they import it and not another on their path, then this process's own PYTHONPATH. Ray's workers start from its
    own scripts, so packages that only PYTHONPATH makes importable here (Ray itself, installed with
    `pip --target`) must reach them through it too."""
    import zimage

    root = str(Path(zimage.__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (root, environ.get("PYTHONPATH")) if p)


def wait_until_interrupted(poll_s: float = POLL_S) -> None:
    """Return only by KeyboardInterrupt (Ctrl-C, SIGINT), within `poll_s` of it. In short sleeps: Ray's native
    threads leave SIGINT unblocked, so the kernel may deliver it to one of them; CPython then only marks it pending
    for the main thread, which acts on it at its next bytecode, not inside a long time.sleep (a `zimage serve --ray`
    once ignored Ctrl-C that way, seen in tests/deploy/test_ray_cli.py)."""
    while True:
        time.sleep(poll_s)


def run_ray(settings, replicas: int = 1, autoscale: tuple[int, int] | None = None, address: str | None = None,
            ready_timeout: float = 3600.0) -> int:
    """Deploy and serve until Ctrl-C. `settings`: ServerSettings (host and port are the Serve proxy's)."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError("--ray needs Ray Serve: pip install 'zimage[server,ray]'") from None
    from zimage.deploy.ray_app import APP_NAME, build

    deployment = EngineDeployment(replicas=replicas, autoscale=autoscale)
    if address:
        ray.init(address=address)
    else:
        needed = deployment.max_replicas * deployment.num_cpus
        ray.init(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}})
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings, engine_of(settings), deployment), name=APP_NAME, route_prefix="/",
                  blocking=False)
        log.info("zimage on Ray Serve at http://%s:%d (%s engine replicas)", settings.host, settings.port,
                 f"{autoscale[0]}..{autoscale[1]}" if autoscale else replicas)
        wait_until_interrupted()
    except KeyboardInterrupt:
        pass
    finally:
        if address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0
