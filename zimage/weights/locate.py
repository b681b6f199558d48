"""Finding a model folder: an explicit path, the Hugging Face cache, the ModelScope cache (in that order).

Nothing is downloaded here. A miss raises ModelNotFoundError listing every place looked and how to get the weights.
Environment (read at call time, so tests and users can change it): HF_HUB_CACHE, HF_HOME, MODELSCOPE_CACHE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import ModelNotFoundError
from zimage.weights.layout import HOW_TO_GET, MODEL_INDEX, TINY_MODEL_ID


@dataclass(frozen=True)
class ModelLocation:
    path: Path  # the folder in diffusers layout
    model_id: str  # repo id, or the folder name for an explicit path
    revision: str | None  # HF snapshot commit, when known
    source: str  # "path" | "huggingface" | "modelscope" | "tiny"


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return Path(hf_home).expanduser() / "hub"


def modelscope_cache() -> Path:
    return Path(os.environ.get("MODELSCOPE_CACHE") or os.path.expanduser("~/.cache/modelscope/hub")).expanduser()


def zimage_cache() -> Path:
    """zimage's own cache (tiny model, converted weights, compile artifacts): $ZIMAGE_CACHE or ~/.cache/zimage."""
    return Path(os.environ.get("ZIMAGE_CACHE") or os.path.expanduser("~/.cache/zimage")).expanduser()


def looks_like_path(model: str) -> bool:
    """A folder, not a repo id: it exists, starts like a path, or has other than exactly one '/'."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or model.count("/") > 1


def _hf_candidates(repo_id: str) -> tuple[Path, list[Path]]:
    """(repo folder, snapshot folders to try, best first): refs/main's commit, then newest snapshots."""
    repo_dir = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    ordered: list[Path] = []
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        ordered.append(snapshots / ref.read_text().strip())
    if snapshots.is_dir():
        others = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
        ordered += [p for p in others if p not in ordered]
    return repo_dir, ordered


def _modelscope_candidates(repo_id: str) -> list[Path]:
    org, _, name = repo_id.partition("/")
    names = [name] if "." not in name else [name, name.replace(".", "___")]  # modelscope escapes dots
    root = modelscope_cache()
    out = []
    for n in names:
        out += [root / "models" / org / n, root / org / n]  # current layout, then the older one
    return out


def locate_model(model: str) -> ModelLocation:
    """Resolve `--model` (a folder, a repo id, or 'tiny-random') to a folder. Raises ModelNotFoundError."""
    if model == TINY_MODEL_ID:
        from zimage.weights.tiny import ensure_tiny_model

        return ModelLocation(ensure_tiny_model(), TINY_MODEL_ID, None, "tiny")

    if looks_like_path(model):
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"model path {str(path)!r} does not exist.\n{HOW_TO_GET}")
        if not path.is_dir():
            raise ModelNotFoundError(f"model path {str(path)!r} is a file; pass the folder that holds {MODEL_INDEX}")
        return ModelLocation(path.resolve(), path.resolve().name, None, "path")

    if model.count("/") != 1:
        raise ModelNotFoundError(
            f"--model {model!r} is neither an existing folder nor a repo id like 'Tongyi-MAI/Z-Image-Turbo'.\n{HOW_TO_GET}"
        )

    looked: list[str] = []
    repo_dir, snapshots = _hf_candidates(model)
    for snap in snapshots:
        if (snap / MODEL_INDEX).is_file():
            return ModelLocation(snap, model, snap.name, "huggingface")
    looked.append(f"Hugging Face cache: {repo_dir}" + ("" if snapshots else " (not there)"))
    for folder in _modelscope_candidates(model):
        if (folder / MODEL_INDEX).is_file():
            return ModelLocation(folder, model, None, "modelscope")
        looked.append(f"ModelScope cache: {folder} (not there)")
    places = "\n".join(f"  - {p}" for p in looked)
    raise ModelNotFoundError(
        f"model {model!r} was not found. Looked in:\n{places}\n"
        f"(caches come from HF_HUB_CACHE / HF_HOME and MODELSCOPE_CACHE)\n{HOW_TO_GET}"
    )
