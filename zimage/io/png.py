"""Writing PNGs with their metadata (atomically: no half-written file on error) and reading it back."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from zimage.errors import UsageError, WriteError, ZImageError
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
    """Write `image` to `path` with metadata. The file appears complete or not at all: it is written to a temporary
    file beside it, then renamed. A file system error (disk full, quota, read-only, permission) is a WriteError
    naming `path`; the temporary file is removed and an existing file at `path` is left as it was."""
    path = Path(path)
    existed = path.exists()
    if existed and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it, or choose another --output", param="output")
    folder = path.parent if str(path.parent) else Path(".")
    tmp = folder / f".{path.name}.{secrets.token_hex(6)}.part"
    try:
        # Created as any new file of the user's (mode 0666 less the umask, applied by the OS): tempfile.mkstemp
        # would make it private (0600). O_EXCL: never an existing file, nor a symlink planted at that name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as e:
        raise _write_error(path, e, existed) from None
    try:
        with os.fdopen(fd, "wb") as f:  # closing flushes: a full disk may first show here
            image.save(f, format="PNG", pnginfo=png_info(meta))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e, existed) from None
        raise
    return path


def _write_error(path: Path, e: OSError, existed: bool) -> WriteError:
    kept = "the existing file is unchanged" if existed else "no file was written"
    return WriteError(f"cannot write {path}: {e.strerror or e}; {kept}")


def encode_png(image, meta: ImageMetadata, compress_level: int | None = None) -> bytes:
    """PNG bytes with metadata. `compress_level`: zlib's 0-9 (None: Pillow's default, 6); PNG is lossless at any
    level, which only trades bytes for encoding time."""
    import io

    buf = io.BytesIO()
    extra = {} if compress_level is None else {"compress_level": compress_level}
    image.save(buf, format="PNG", pnginfo=png_info(meta), **extra)
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
