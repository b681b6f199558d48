"""Server settings: one dataclass, a comment per field. The CLI (`zimage serve`) and tests build it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from zimage.engine.config import EngineConfig

API_KEY_ENV = "ZIMAGE_API_KEY"
URL_SECRET_ENV = "ZIMAGE_URL_SECRET"
DATA_DIR_ENV = "ZIMAGE_DATA_DIR"
DATABASE_URL_ENV = "ZIMAGE_DATABASE_URL"  # read by the CLI for --database-url, as API_KEY_ENV for --api-key


def default_data_dir() -> Path:
    """$ZIMAGE_DATA_DIR, else $XDG_DATA_HOME/zimage, else ~/.local/share/zimage."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "zimage"


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless told otherwise: exposing a GPU box is a decision, not a default
    port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)  # jobs.db (SQLite, WAL) and images/ live here
    database_url: str | None = None  # postgresql://... (a cluster's shared store); None: SQLite <data_dir>/jobs.db
    images_url: str | None = None  # a directory or fsspec URL (s3://bucket/prefix); None: <data_dir>/images
    retention_age_s: float | None = None  # delete finished, fetched jobs unused this long (store/retention.py)
    retention_bytes: int | None = None  # keep the images' total under this, same rule; None: no limit
    api_key: str | None = None  # None: no key (the CLI also reads $ZIMAGE_API_KEY)
    # the engine to load (used only when create_app is not handed an engine): the same config `zimage generate`
    # builds, so a new engine option reaches the server without being copied here field by field
    engine: EngineConfig = field(default_factory=EngineConfig)
    # scheduling
    max_queue: int = 64  # jobs waiting (not running) before POSTs get 429 + Retry-After
    max_batch: int = 8  # images per engine call; compatible queued jobs are batched up to this
    batch_wait_s: float = 0.0  # extra wait for companions before starting a batch (0: batch what is queued)
    concurrent_batches: int = 1  # engine calls in flight at once: 1 for a local engine (one GPU); the Ray
    # ingress sets its engine replicas' capacity (zimage.deploy), where Ray Serve routes and batches them
    encode_threads: int = 2  # threads that encode and store finished images, so the GPU worker moves on at once
    max_attempts: int = 3  # a job whose run was interrupted (crash) this many times is failed, not re-run forever
    # body limit of the routes that take pictures (POST /v1/images/edits; POST /v1/jobs allows 4/3 of it, base64):
    # two files at zimage.io.input_image's 25 MiB per file, plus 1 MiB of form fields. Other bodies: 1 MiB.
    max_upload_bytes: int = 51 * 2**20
    # defaults for requests that do not say
    default_size: tuple[int, int] = (1024, 1024)  # OpenAI "size": "auto" and missing size mean this
    default_steps: int | None = None  # None: the model's recipe (zimage.recipe: 8 for Turbo), filled by the engine
    # warm-up: one generation before /health says ready (compiles kernels, fills caches); None skips it
    warmup_size: tuple[int, int] | None = (1024, 1024)
    warmup_steps: int = 2
    # web
    cors_origins: tuple[str, ...] = ()  # CORS is off unless origins are given
    public_url: str | None = None  # base of image URLs in responses; None: relative URLs (never the Host header)
    url_ttl_s: int = 3600  # with an API key, image URLs are signed and open without the key this long; 0: unsigned
    url_secret: str | None = None  # HMAC key of signed URLs; None: <data_dir>/url-secret, created on first use
    previews: bool = True  # SSE "preview" events: a small JPEG of the latents every few steps
    log_level: str = "info"

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "jobs.db"

    @property
    def images_dir(self) -> Path:
        return Path(self.data_dir) / "images"
