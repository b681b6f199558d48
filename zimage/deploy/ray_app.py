"""The Ray Serve application: `serve run zimage.deploy.ray_app:app model=... replicas=...`, `serve deploy
deploy/ray-serve.yaml`, or `zimage serve --ray` (zimage.deploy.ray_cli).

    HTTP -> Serve's proxy -> ZImageIngress (1 replica): the server's own FastAPI app (zimage.server.create_app:
            the same routes, error bodies, auth, job store, worker, events, metrics, page), whose worker calls a
            RemoteEngine instead of a local Engine
         -> ZImageEngine (N replicas, or autoscaled): EngineReplica, one Engine each, @serve.batch -> generate_many

The ingress is one replica: it owns the queue order, positions and event streams of its jobs, as `zimage serve`
does; the engines, where the time goes, scale. With the job store in PostgreSQL and images at a shared URL, a
restarted ingress (on any node) recovers every accepted job. Its worker does not batch (max_batch 1) and keeps as
many calls in flight as the replicas accept at full scale: Serve routes them, counts them for autoscaling, and
the replicas batch them.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from ray import serve

from zimage.deploy.config import EngineDeployment, parse_autoscale, with_engine
from zimage.deploy.engine_replica import EngineReplica
from zimage.errors import UsageError

APP_NAME = "zimage"


@serve.deployment(name="ZImageIngress", num_replicas=1,
                  # No CPU reserved: like Serve's own proxies it mostly waits (PNG encoding aside), and a small
                  # cluster's CPUs are the engine replicas'.
                  ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=1000,  # HTTP requests: most just wait on a job (sync calls, SSE streams)
                  graceful_shutdown_timeout_s=30)
@serve.ingress()
class ZImageIngress:
    def __init__(self, engine, settings):
        self._engine_handle, self._settings, self._app = engine, settings, None

    def __serve_build_asgi_app__(self):
        from zimage.deploy.remote_engine import RemoteEngine
        from zimage.server.app import create_app

        remote = RemoteEngine(self._engine_handle)
        self._app = create_app(self._settings, engine_loader=remote.wait_ready)
        return self._app

    def check_health(self) -> None:
        """Serve replaces an ingress whose worker gave up (e.g. no engine replica became ready): the new one
        recovers the jobs from the store."""
        state = getattr(self._app.state, "zimage", None) if self._app is not None else None
        if state is not None and state.worker.state == "failed":
            raise RuntimeError(f"the ingress's worker failed: {state.worker.detail}")


def build(settings, engine, deployment: EngineDeployment):
    """The bound application: `settings` are the server's (ServerSettings), `engine` the replicas' EngineConfig."""
    import ray

    num_gpus = deployment.num_gpus
    if num_gpus is None:
        has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        num_gpus = 1 if engine.device != "cpu" and has_gpus else 0
    scaling = ({"autoscaling_config": {"min_replicas": deployment.autoscale[0],
                                       "max_replicas": deployment.autoscale[1],
                                       "target_ongoing_requests": deployment.target_ongoing_requests
                                       or deployment.max_batch}}
               if deployment.autoscale else {"num_replicas": deployment.replicas})
    engine_deployment = serve.deployment(
        EngineReplica, name="ZImageEngine",
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": deployment.num_cpus},
        max_ongoing_requests=deployment.ongoing,
        # Loading the published model from a cold disk takes minutes; compile warm-up too.
        health_check_timeout_s=120, graceful_shutdown_timeout_s=60, **scaling)
    threads = deployment.torch_threads or (max(1, int(deployment.num_cpus)) if num_gpus == 0 else None)
    replica = engine_deployment.bind(engine, deployment.max_batch, deployment.batch_wait_s, settings.warmup_size,
                                     settings.warmup_steps, threads)
    ingress_settings = replace(settings, warmup_size=None,  # the replicas warm themselves
                               max_batch=1, concurrent_batches=deployment.capacity)
    return ZImageIngress.bind(replica, ingress_settings)


# `serve run zimage.deploy.ray_app:app key=value ...` (and the `args:` of a serve deploy config): these keys.
_ARGS = {
    "model": "model folder, repo id or tiny-random", "device": "auto | cpu | cuda",
    "dtype": "auto | bf16 | fp16 | fp32",
    "speed": "auto | eager | compile", "fp8": "true | false", "vram_budget": "GiB",
    "replicas": "N", "autoscale": "MIN:MAX", "target_ongoing_requests": "per replica",
    "max_ongoing_requests": "per replica", "max_batch": "images per engine call", "batch_wait": "seconds",
    "gpus": "per replica", "cpus": "per replica", "torch_threads": "per CPU replica",
    "database_url": "postgresql://... (default: SQLite in data_dir)", "images_url": "dir or fsspec URL",
    "data_dir": "path", "api_key": "key (default: $ZIMAGE_API_KEY)", "retention": "7d | 20GB | 7d,20GB",
    "warmup_size": "WxH | none", "default_size": "WxH", "default_steps": "N", "max_queue": "N",
    "public_url": "URL", "cors_origin": "origin[,origin]",
    "lora": "NAME[:SCALE][,...] merged for every image", "lora_dir": "folder of the LoRAs requests may name "
    "(every replica's path)", "lora_slots": "runtime LoRA sets per engine call", "lora_rank": "runtime slots' rank",
}


def app(args: dict):
    """The application builder that `serve run` and `serve deploy` call with the given key=value arguments."""
    settings, engine, deployment = parse_args(args)
    return build(settings, engine, deployment)


def _lora_options(a: dict, number) -> dict:
    """EngineConfig's per-request LoRA fields from lora_dir / lora_slots / lora_rank, checked as `zimage serve`'s
    --lora-dir / --lora-slots / --lora-rank are (the folder must exist where this runs: give every replica the same
    path, e.g. a shared volume)."""
    from types import SimpleNamespace

    from zimage.cli.serve import lora_options

    return lora_options(SimpleNamespace(
        lora_dir=Path(a["lora_dir"]) if "lora_dir" in a else None,
        lora_slots=number("lora_slots", int, None), lora_rank=number("lora_rank", int, None)))


def parse_args(args: dict, environ=os.environ):
    """key=value arguments -> (ServerSettings, EngineConfig, EngineDeployment); a bad one is a UsageError."""
    from zimage.engine.config import EngineConfig
    from zimage.server.settings import API_KEY_ENV, ServerSettings, default_data_dir
    from zimage.server.store.retention import parse_retention
    from zimage.sizes import parse_size

    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        known = ", ".join(f"{k} ({v})" for k, v in _ARGS.items())
        raise UsageError(f"unknown argument(s) {', '.join(unknown)}; known: {known}", param=unknown[0])
    a = {k: str(v) for k, v in args.items()}

    def number(key, kind, default):
        if key not in a:
            return default
        try:
            return kind(a[key])
        except ValueError:
            raise UsageError(f"{key}={a[key]!r} is not a {kind.__name__}", param=key) from None

    def flag(key):
        value = a.get(key, "false").lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError(f"{key}={a[key]!r}: give true or false", param=key)
        return value in ("true", "1", "yes")

    def size(key, default):
        if key not in a:
            return default
        if a[key].lower() == "none":
            return None
        try:
            return parse_size(a[key])
        except UsageError as e:
            raise UsageError(f"{key}: {e}", param=key) from None

    retention = None
    if "retention" in a:
        try:
            retention = parse_retention(a["retention"])
        except ValueError as e:
            raise UsageError(f"retention: {e}", param="retention") from None
    engine = EngineConfig(model=a.get("model", EngineConfig.model), device=a.get("device", "auto"),
                          dtype=a.get("dtype", "auto"), speed=a.get("speed", "auto"), fp8=flag("fp8"),
                          vram_budget_gib=number("vram_budget", float, None),
                          loras=tuple(filter(None, a.get("lora", "").split(","))),
                          **_lora_options(a, number))
    base = ServerSettings()
    settings = with_engine(replace(
        base, data_dir=Path(a["data_dir"]).expanduser() if "data_dir" in a else default_data_dir(),
        api_key=a.get("api_key") or environ.get(API_KEY_ENV) or None,
        database_url=a.get("database_url"), images_url=a.get("images_url"),
        retention_age_s=retention.max_age_s if retention else None,
        retention_bytes=retention.max_bytes if retention else None,
        warmup_size=size("warmup_size", base.warmup_size), default_size=size("default_size", base.default_size),
        default_steps=number("default_steps", int, base.default_steps),
        max_queue=number("max_queue", int, base.max_queue), public_url=a.get("public_url"),
        cors_origins=tuple(filter(None, a.get("cors_origin", "").split(","))),
    ), engine)
    deployment = EngineDeployment(
        replicas=number("replicas", int, 1),
        autoscale=parse_autoscale(a["autoscale"]) if "autoscale" in a else None,
        target_ongoing_requests=number("target_ongoing_requests", float, None),
        max_ongoing_requests=number("max_ongoing_requests", int, None),
        max_batch=number("max_batch", int, 8), batch_wait_s=number("batch_wait", float, 0.0),
        num_gpus=number("gpus", float, None), num_cpus=number("cpus", float, 1.0),
        torch_threads=number("torch_threads", int, None))
    return settings, engine, deployment
