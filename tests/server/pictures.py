"""Picture and mask files for the image-input server tests (test_server_edits*.py): made here, as bytes."""

import io
import struct
import zlib

import numpy as np
from PIL import Image

SIZE = 256


def encode(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(size=(SIZE, SIZE), seed=0) -> bytes:
    """A PNG with structure (a gradient and noise), so that img2img has something to keep."""
    w, h = size
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([x, y, 255 - x], -1) * 0.7 + rng.integers(0, 76, (h, w, 3))
    return encode(Image.fromarray(rgb.astype(np.uint8), "RGB"))


def bw_mask(size=(SIZE, SIZE), box=(64, 64, 192, 192)) -> bytes:
    """zimage's convention: white = repaint (the box), black = keep."""
    img = Image.new("L", size, 0)
    img.paste(255, box)
    return encode(img)


def alpha_mask(size=(SIZE, SIZE), box=(64, 64, 192, 192)) -> bytes:
    """OpenAI's convention: an RGBA PNG, transparent = edit (the box), opaque = keep; the colours are noise."""
    rng = np.random.default_rng(1)
    rgba = np.concatenate([rng.integers(0, 256, (size[1], size[0], 3)), np.full((size[1], size[0], 1), 255)], -1)
    x0, y0, x1, y1 = box
    rgba[y0:y1, x0:x1, 3] = 0
    return encode(Image.fromarray(rgba.astype(np.uint8), "RGBA"))


def black_mask(size=(SIZE, SIZE)) -> bytes:
    return encode(Image.new("L", size, 0))


def animated_gif() -> bytes:
    frames = [Image.new("P", (SIZE, SIZE), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def bomb(side=30000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (the IHDR rewritten, its CRC fixed)."""
    data = bytearray(encode(Image.new("L", (16, 16), 0)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))  # type + the 13 bytes of IHDR data
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def truncated() -> bytes:
    data = picture()
    return data[: len(data) // 2]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
