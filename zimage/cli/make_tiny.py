"""`zimage make-tiny FOLDER`: write a random-weight Z-Image folder in the published layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a random-weight model folder (tests, benchmarks)",
                       description="Write a randomly initialised Z-Image folder in the published layout: tiny by "
                                   "default (tests), or --full-size (the real shapes, 33 GB, for benchmarks).")
    p.add_argument("folder", type=Path, help="a new or empty folder (created, with its parents)")
    p.add_argument("--full-size", action="store_true", help="the published shapes (6.15B transformer, Qwen3-4B)")
    p.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster for --full-size)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from zimage.weights.tiny import build_model_folder

    folder = args.folder
    created = _prepare(folder)  # usage errors, before torch is imported
    try:
        build_model_folder(folder, full_size=args.full_size, seed=args.seed, device=args.device)
    except BaseException as e:
        # The folder was new or empty, so everything in it is ours: a half-written model is worse than none.
        _remove_partial(folder, created)
        if _is_io_failure(e):
            from zimage.errors import WriteError

            reason = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise WriteError(f"cannot write the model folder {folder}: {reason}; what was written is removed") from None
        raise
    print(folder)
    return 0


def _prepare(folder: Path) -> Path | None:
    """Check that `folder` is new or an empty, writable folder, and create it. Returns the topmost folder created
    (to remove on failure), or None when `folder` already existed."""
    from zimage.errors import UsageError

    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise UsageError(f"{folder} is a file, not a folder; give a new or an empty folder", param="folder")
        try:
            if any(folder.iterdir()):
                raise UsageError(f"{folder} exists and is not empty", param="folder")
        except OSError as e:
            raise UsageError(f"{folder} cannot be read: {e.strerror}", param="folder") from None
        created = None
    else:
        created = folder
        while not created.parent.exists() and created.parent != created:
            created = created.parent
        try:
            folder.mkdir(parents=True)
        except OSError as e:
            raise UsageError(f"{folder} cannot be created: {e.strerror}", param="folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{folder} is not writable", param="folder")
    return created


def _remove_partial(folder: Path, created: Path | None) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _is_io_failure(e: BaseException) -> bool:
    """A file system error (disk full, quota, file too large, read-only). Python's writes raise OSError; the
    tokenizers and safetensors libraries (Rust) raise a plain Exception / SafetensorError whose text ends with
    Rust's form of the same error, "... (os error 28)"."""
    return isinstance(e, OSError) or (type(e).__name__ in ("Exception", "SafetensorError") and "(os error " in str(e))
