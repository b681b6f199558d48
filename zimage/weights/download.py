"""Fetching weights on request: huggingface_hub's snapshot_download (with its progress bars), or ModelScope's.
HF_HUB_OFFLINE=1 is honoured: nothing is fetched, and the error says so."""

from __future__ import annotations

import os
from pathlib import Path

from zimage.errors import ZImageError

# Only what the pipeline needs (the repo also holds assets/ and README images).
ALLOW_PATTERNS = ["model_index.json", "transformer/*", "text_encoder/*", "vae/*", "tokenizer/*", "scheduler/*"]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(repo_id: str, revision: str | None = None, source: str = "huggingface") -> Path:
    if source == "modelscope":
        try:
            from modelscope import snapshot_download as ms_snapshot_download
        except ImportError:
            raise ZImageError("ModelScope downloads need the modelscope package: pip install modelscope") from None
        return Path(ms_snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    if offline():
        raise ZImageError("HF_HUB_OFFLINE is set, so nothing will be downloaded; unset it to fetch the weights")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    from zimage.weights.locate import hf_hub_cache

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                      cache_dir=str(hf_hub_cache())))
    except (HfHubHTTPError, OSError) as e:
        raise ZImageError(f"downloading {repo_id} failed: {e}") from None
