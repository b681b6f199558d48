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
        import zimage

        # The workers import the zimage this process runs (a checkout, a virtualenv), not another on their path.
        root = str(Path(zimage.__file__).resolve().parent.parent)
        needed = deployment.max_replicas * deployment.num_cpus
        ray.init(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build(settings, engine_of(settings), deployment), name=APP_NAME, route_prefix="/",
                  blocking=False)
        log.info("zimage on Ray Serve at http://%s:%d (%s engine replicas)", settings.host, settings.port,
                 f"{autoscale[0]}..{autoscale[1]}" if autoscale else replicas)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if address:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0
