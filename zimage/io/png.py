"""Writing PNGs with their metadata (atomically: no half-written file on error) and reading it back."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from zimage.errors import UsageError, ZImageError
from zimage.io.metadata import ImageMetadata

JSON_KEY = "zimage"
A1111_KEY = "parameters"


def png_info(meta: ImageMetadata):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(A1111_KEY, meta.a1111_parameters())
    info.add_itxt(JSON_KEY, meta.to_json())
    return info


def save_png(image, path: Path, meta: ImageMetadata, overwrite: bool = False) -> Path:
    """Write `image` to `path` with metadata. The file appears complete or not at all."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it, or choose another --output", param="output")
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    try:
        if hasattr(os, "fchmod"):  # POSIX (Windows has no such modes before Python 3.13)
            # mkstemp makes the file private (0600); the image gets the mode any new file of the user's would
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(meta))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's file-creation mask. Linux reports it in /proc; elsewhere it can only be read by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def encode_png(image, meta: ImageMetadata) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=png_info(meta))
    return buf.getvalue()


def read_png_text(path: Path) -> dict[str, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return {k: v for k, v in (im.text or {}).items() if isinstance(v, str)}
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist", param="from_png") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{path} is not a readable image: {e}", param="from_png") from None


def read_metadata(path: Path) -> ImageMetadata:
    """The settings an image was made with; a clear error if it carries none."""
    text = read_png_text(Path(path))
    if JSON_KEY not in text:
        hint = " (it has A1111 parameters, but not zimage's)" if A1111_KEY in text else ""
        raise UsageError(f"{path} carries no zimage generation parameters{hint}", param="from_png")
    try:
        return ImageMetadata.from_json(text[JSON_KEY])
    except (ValueError, TypeError) as e:
        raise ZImageError(f"{path}: its zimage parameters cannot be read: {e}") from None
