"""`zimage serve`: the HTTP server (OpenAI-compatible images API, async jobs, web page). See docs/server.md."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from zimage.errors import UsageError

DEFAULT_LORA_SLOTS = 4  # with --lora-dir: a batch mixes up to 4 sets (at rank 64 about 1.5 GiB in bf16, full size)


def register(subparsers) -> None:
    from zimage.cli.common import add_model_flags
    from zimage.engine.config import MAX_LORA_SLOTS, EngineConfig
    from zimage.server.settings import ServerSettings

    p = subparsers.add_parser(
        "serve", help="run the HTTP server (OpenAI-compatible API, jobs, web page)",
        description="Load the model once, warm it up, and serve it: POST /v1/images/generations (OpenAI), "
                    "/v1/jobs (async, with progress events), a web page at /, /health and /metrics. "
                    "Jobs and images are kept under --data-dir and survive a crash.",
    )
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only; 0.0.0.0 exposes it)")
    g.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health and the page "
                        "(default: $ZIMAGE_API_KEY, else no key)")
    g.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable; default: CORS off)")
    g.add_argument("--public-url", default=None,
                   help="base of image URLs in responses, e.g. https://img.example.com (default: relative URLs, "
                        "/v1/images/...)")
    g.add_argument("--url-ttl", type=int, default=3600, metavar="SECONDS",
                   help="with an API key, image URLs are signed and open without the key for this long; 0: "
                        "unsigned URLs, which need the key (default: %(default)s)")
    g.add_argument("--url-secret", default=None,
                   help="the HMAC key of signed image URLs (default: $ZIMAGE_URL_SECRET, else a random one kept in "
                        "DATA_DIR/url-secret, mode 0600, so URLs stay valid across restarts)")
    g = p.add_argument_group("jobs")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="where jobs.db and images/ live (default: $ZIMAGE_DATA_DIR, else ~/.local/share/zimage)")
    g.add_argument("--max-queue", type=int, default=64, help="waiting jobs before 429 (default: %(default)s)")
    g.add_argument("--max-upload-mb", type=float, default=ServerSettings.max_upload_bytes / 2**20, metavar="MiB",
                   help="largest body of an image edit (picture + mask + fields; POST /v1/jobs with base64 pictures "
                        "may be 4/3 of it), 413 beyond; other bodies stay at 1 MiB (default: %(default)g)")
    g.add_argument("--max-batch", type=int, default=8,
                   help="images per engine call when batching compatible jobs (default: %(default)s)")
    g.add_argument("--batch-wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for companions before starting a batch (default: %(default)s)")
    g.add_argument("--default-size", default="1024x1024", help="size for requests that say 'auto' or nothing")
    g.add_argument("--warmup-size", default="1024x1024",
                   help="WIDTHxHEIGHT of the warm-up generation, or 'none' (default: %(default)s)")
    g.add_argument("--no-previews", action="store_true", help="no preview images in job events")
    g.add_argument("--database-url", default=None, metavar="URL",
                   help="postgresql://user@host/db: jobs in PostgreSQL, shared by several servers or Ray replicas "
                        "(default: $ZIMAGE_DATABASE_URL, else SQLite in --data-dir; the password from PGPASSWORD or "
                        "~/.pgpass)")
    g.add_argument("--images-url", default=None, metavar="URL",
                   help="a directory or fsspec URL such as s3://bucket/prefix (default: DATA_DIR/images)")
    g.add_argument("--retention", default=None, metavar="AGE,SIZE",
                   help="delete finished jobs whose images were all fetched: 7d, 20GB or 7d,20GB (default: keep "
                        "all; the rule is in docs/server.md)")
    g.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g = p.add_argument_group("LoRA (docs/server.md: LoRAs)")
    g.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                   help="the LoRAs clients may name in a request's 'loras' (files DIR/NAME.safetensors and PEFT "
                        "folders; GET /v1/loras lists them); clients give names only, never paths. --lora NAME "
                        "also finds names here")
    g.add_argument("--lora-slots", type=int, default=None, metavar="N",
                   help=f"different per-request LoRA sets one batch can mix (1..{MAX_LORA_SLOTS}; each costs "
                        f"memory: slots x rank x the transformer's in+out features; default: "
                        f"{DEFAULT_LORA_SLOTS} with --lora-dir)")
    g.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="rank of each runtime slot: a request's LoRA ranks summed must fit (default: "
                        f"{EngineConfig.lora_rank})")
    r = p.add_argument_group("ray serve (docs/ray.md)")
    r.add_argument("--ray", action="store_true", help="serve on Ray Serve (a local Ray cluster, or --ray-address)")
    scale = r.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="engine replicas, one GPU each (default: 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="let Ray Serve scale the engine replicas between MIN and MAX")
    r.add_argument("--ray-address", default=None, metavar="ADDR", help="join this Ray cluster instead of starting one")
    add_model_flags(p)
    p.set_defaults(func=run)


def settings_from_args(args, environ=os.environ):
    """argparse namespace -> ServerSettings (validated: a bad value is a UsageError naming the flag)."""
    from zimage.cli.common import engine_config
    from zimage.server.settings import (API_KEY_ENV, DATABASE_URL_ENV, URL_SECRET_ENV, ServerSettings,
                                        default_data_dir)
    from zimage.server.store.retention import parse_retention
    from zimage.server.size_text import parse_size_text

    def size(flag, text):
        try:
            return parse_size_text(text, param=f"--{flag}")
        except UsageError as e:
            raise UsageError(str(e), param=flag) from None

    for flag, value, low in (("port", args.port, 0), ("max-queue", args.max_queue, 1),
                             ("max-batch", args.max_batch, 1)):
        if not low <= value <= 65535:
            raise UsageError(f"--{flag} must be between {low} and 65535, got {value}", param=flag)
    if not 1 <= args.max_upload_mb <= 1024:
        raise UsageError(f"--max-upload-mb must be between 1 and 1024 MiB, got {args.max_upload_mb:g}",
                         param="max-upload-mb")
    if args.batch_wait < 0:
        raise UsageError("--batch-wait must be >= 0", param="batch-wait")
    if args.url_ttl < 0:
        raise UsageError(f"--url-ttl must be >= 0 seconds, got {args.url_ttl}", param="url-ttl")
    retention = None
    if args.retention:
        try:
            retention = parse_retention(args.retention)
        except ValueError as e:
            raise UsageError(f"--retention: {e}", param="retention") from None
    url_secret = args.url_secret or environ.get(URL_SECRET_ENV) or None
    if url_secret is not None and len(url_secret) < 32:
        raise UsageError("--url-secret must be at least 32 characters (a guessable secret lets anyone sign URLs)",
                         param="url-secret")
    return ServerSettings(
        host=args.host, port=args.port, data_dir=args.data_dir or default_data_dir(),
        api_key=args.api_key or environ.get(API_KEY_ENV) or None,
        engine=replace(engine_config(args, show_progress=False), **lora_options(args)),  # expected_images None:
        # a server makes many
        max_queue=args.max_queue, max_batch=args.max_batch, max_upload_bytes=int(args.max_upload_mb * 2**20),
        batch_wait_s=args.batch_wait, default_size=size("default-size", args.default_size),
        warmup_size=None if args.warmup_size.lower() == "none" else size("warmup-size", args.warmup_size),
        cors_origins=tuple(args.cors_origin), public_url=args.public_url, url_ttl_s=args.url_ttl,
        url_secret=url_secret, previews=not args.no_previews,
        log_level=args.log_level,
        database_url=args.database_url or environ.get(DATABASE_URL_ENV) or None, images_url=args.images_url,
        retention_age_s=retention.max_age_s if retention else None,
        retention_bytes=retention.max_bytes if retention else None,
    )


def lora_options(args) -> dict:
    """EngineConfig fields of the LoRA flags. Request LoRAs are names in --lora-dir (lora_names_only: a client never
    names a path); runtime slots exist only with a folder to name from."""
    from zimage.engine.config import MAX_LORA_SLOTS, EngineConfig

    slots, rank = args.lora_slots, args.lora_rank
    if args.lora_dir is None:
        for flag, value in (("lora-slots", slots), ("lora-rank", rank)):
            if value is not None:
                raise UsageError(f"--{flag} needs --lora-dir (per-request LoRAs are named from that folder)",
                                 param=flag)
        return {}
    if not args.lora_dir.expanduser().is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir}: no such folder", param="lora-dir")
    if slots is not None and slots < 1:
        raise UsageError(f"--lora-slots must be between 1 and {MAX_LORA_SLOTS} with --lora-dir, got {slots} (omit "
                         "--lora-dir for no per-request LoRAs)", param="lora-slots")
    return {"lora_dir": str(args.lora_dir.expanduser()), "lora_names_only": True,
            "lora_slots": DEFAULT_LORA_SLOTS if slots is None else slots,
            "lora_rank": EngineConfig.lora_rank if rank is None else rank}


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the server needs its extras: pip install 'zimage[server]' ({e.name} is missing)") from None
    settings = settings_from_args(args)
    if args.ray:
        from zimage.deploy.config import parse_autoscale
        from zimage.deploy.ray_cli import run_ray

        autoscale = parse_autoscale(args.autoscale) if args.autoscale else None
        return run_ray(settings, args.replicas, autoscale, args.ray_address)
    from zimage.server.launch import serve

    serve(settings)
    return 0
