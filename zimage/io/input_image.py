"""Pictures and masks given as inputs (img2img, inpainting, outpainting): loading them, the rules they must meet,
the size the model works at, and the tensors the VAE encoder and the inpainting blend take.

The rules; each broken one is a UsageError naming the file or value and what is allowed:
- Formats: PNG, JPEG (also MPO, the multi-picture JPEG some cameras write: its first picture is used) and WebP.
  GIF and animated pictures (APNG, animated WebP) are refused, and so is any other format.
- At most MAX_INPUT_BYTES (25 MiB) of file and MAX_INPUT_SIDE (4096) pixels per side, so at most 16.8 MP decoded
  (an output is at most 2048x2048, zimage.sizes). The size in the file's header is checked before any pixel is
  decoded, so a decompression bomb (a small file whose header claims a huge picture) is refused without decoding
  it. Pillow's own bomb check (Image.MAX_IMAGE_PIXELS, left as it is) fires only above 89 MP, where this bound has
  already refused the file; its warning is turned into an error for the duration of the open call only.
- Truncated or damaged files are errors (Pillow's default, ImageFile.LOAD_TRUNCATED_IMAGES = False, not changed).
- EXIF orientation is applied (a phone's portrait photo stays portrait); damaged EXIF data is an error.
- Pictures: transparency (RGBA, LA, PA, or a palette/grayscale/RGB transparency key) is composited on WHITE;
  grayscale, palette, CMYK and 16-bit grayscale become 8-bit RGB.
- Masks: one channel (L), white = repaint, black = keep; transparency is composited on BLACK (a stroke painted on a
  transparent canvas repaints the stroke only); colour masks become L (Pillow's ITU-R 601 luma).

Sizes (prepare_inputs): without a requested size the picture keeps its own size rounded DOWN to a multiple of 16
by cropping the few extra pixels (centred; a note says so): cropping, unlike diffusers' preprocess, which resamples
the picture to the rounded size, keeps every kept pixel as it was and the mask aligned pixel for pixel. The size
must then be within 256..2048 per side; a larger picture needs a size and a resize mode. With a requested size
the picture must have that size unless a mode says how to get there (RESIZE_MODES, Lanczos as diffusers' image
processor): "stretch" ignores the aspect ratio, "crop" scales to cover and crops the centre, "fit" scales to fit
inside and pads the rest by repeating the edge pixels (the mask is 0, keep, in the padding). A mask must have the
picture's size unless a resize mode is given, which then brings the mask to the output size the same way.

Outpainting (outpaint, expand_to) pads the canvas and builds the mask: white over the new area (and `overlap`
pixels into the picture along the padded sides, so the seam itself is repainted). The new area is filled by
repeating the picture's edge pixels rather than a flat grey: at strength < 1 the new area starts from the picture's
own colours with no step at the seam; at strength 1 (the usual choice for outpainting) the fill barely matters,
since the repainted area starts from pure noise and the fill only reaches the kept latents through the encoder.

Hashes (for the PNG metadata): the SHA-256 of the file's bytes; for a PIL image given by a program, of its 8-bit
pixels as used (RGB for pictures, L for masks, after transparency and EXIF handling) prefixed by b"RGB WxH\\n" or
b"L WxH\\n" (raw pixels rather than a PNG encoding, whose bytes depend on the zlib build).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from zimage.errors import UsageError
from zimage.sizes import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, check_side

MAX_INPUT_BYTES = 25 * 1024 * 1024  # per file
MAX_INPUT_SIDE = 4096  # pixels per side as decoded: at most 4096 * 4096 = 16,777,216 pixels (16.8 MP)
RESIZE_MODES = ("fit", "crop", "stretch")
MAX_MASK_BLUR = 128  # pixels (Gaussian radius)
MASK_CELL = 8  # the VAE's downsampling: the inpainting blend reads the mask at one pixel per 8x8 cell

_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")  # what Pillow may parse at all (GIF only to refuse it by name; the
# JPEG plugin also opens MPO files, as format "MPO")
_ALLOWED = "PNG, JPEG or WebP"
_SIGNATURES = (  # only to name a refused format in the message; never parsed
    (0, b"GIF8", "GIF"), (0, b"BM", "BMP"), (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (0, b"8BPS", "PSD"),
    (0, b"%PDF", "PDF"), (0, b"\x00\x00\x01\x00", "ICO"), (4, b"ftypavif", "AVIF"), (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"), (0, b"\x89PNG", "PNG"), (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"RIFF", "WebP"),
)


@dataclass(frozen=True)
class InputImage:
    """A picture: `pixels` (PIL, mode RGB) as loaded or as prepared for the model."""

    pixels: object  # PIL.Image.Image, RGB
    sha256: str  # of the file's bytes (or of the pixels of a PIL image: see the module docstring)
    source: str  # the path given, or "<PIL image>"
    source_size: tuple[int, int]  # (width, height) as decoded, EXIF orientation applied
    notes: tuple[str, ...] = ()  # what was done to it, for the user (composited on white, cropped to 16, ...)

    @property
    def width(self) -> int:
        return self.pixels.width

    @property
    def height(self) -> int:
        return self.pixels.height


@dataclass(frozen=True)
class InputMask:
    """A mask: `pixels` (PIL, mode L; >= 128 = repaint once binarised, as the reference's mask processor does)."""

    pixels: object  # PIL.Image.Image, L
    sha256: str
    source: str  # the path, "<PIL image>", or "<outpaint L,T,R,B>" for a built mask
    source_size: tuple[int, int]
    notes: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return self.pixels.width

    @property
    def height(self) -> int:
        return self.pixels.height


# ---------------------------------------------------------------- loading


def load_image(source, param: str = "image") -> InputImage:
    """A path (str or PathLike) or a PIL image -> InputImage (RGB, its own size). UsageError(param=param) if bad."""
    pil, sha, label, notes = _load(source, param)
    rgb, more = _to_rgb(pil)
    if sha is None:
        sha = _pixel_hash(rgb)
    return InputImage(rgb, sha, label, rgb.size, notes + more)


def load_mask(source, param: str = "mask") -> InputMask:
    """A path or a PIL image -> InputMask (L, its own size). UsageError(param=param) if bad."""
    pil, sha, label, notes = _load(source, param)
    gray, more = _to_mask(pil)
    if sha is None:
        sha = _pixel_hash(gray)
    return InputMask(gray, sha, label, gray.size, notes + more)


def load_image_bytes(data: bytes, label: str, param: str = "image") -> InputImage:
    """A file's bytes (e.g. an HTTP upload) -> InputImage, by the same rules as a file; `label` names it in errors."""
    pil, notes = _decode(_check_bytes(data, param, label), param, label)
    rgb, more = _to_rgb(pil)
    return InputImage(rgb, hashlib.sha256(data).hexdigest(), label, rgb.size, notes + more)


def load_mask_bytes(data: bytes, label: str, param: str = "mask", transparent_repaints: bool = False) -> InputMask:
    """A file's bytes -> InputMask. transparent_repaints: OpenAI's mask convention (an RGBA PNG whose transparent
    pixels are the area to edit): when the mask has any transparent pixel, its alpha channel is the mask
    (repaint = 255 - alpha) and the colours are ignored; a mask without transparency keeps white = repaint."""
    pil, notes = _decode(_check_bytes(data, param, label), param, label)
    alpha = _transparency(pil) if transparent_repaints else None
    if alpha is not None:
        from PIL import ImageOps

        gray, more = ImageOps.invert(alpha), ("mask transparency used as the mask (transparent = repaint)",)
    else:
        gray, more = _to_mask(pil)
    return InputMask(gray, hashlib.sha256(data).hexdigest(), label, gray.size, notes + more)


def _check_bytes(data: bytes, param: str, label: str) -> bytes:
    if not isinstance(data, (bytes, bytearray)):
        raise UsageError(f"the {param} must be the bytes of a picture file, got {type(data).__name__}", param=param)
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{param} file {label} is {len(data) / 2**20:.1f} MiB; at most "
                         f"{MAX_INPUT_BYTES // 2**20} MiB are accepted", param=param)
    if not data:
        raise UsageError(f"{param} file {label} is empty", param=param)
    return bytes(data)


def _transparency(img):
    """The alpha channel (L) of a picture with at least one pixel not fully opaque, else None."""
    img = _to_8bit(img)
    if not _has_alpha(img):
        return None
    alpha = img.convert("RGBA").getchannel("A")
    return alpha if alpha.getextrema()[0] < 255 else None


def _load(source, param: str):
    """(decoded PIL image, sha256 of the file or None for a PIL input, label, notes)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        label = "<PIL image>"
        if source.format == "GIF":
            raise UsageError(f"the {param} is a GIF; use {_ALLOWED}", param=param)
        _check_size(source.size, param, label)
        if getattr(source, "n_frames", 1) > 1 and source.format != "MPO":
            raise UsageError(f"the {param} is animated ({source.n_frames} frames); give a still picture", param=param)
        try:
            source.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise UsageError(f"the {param} could not be decoded (truncated or damaged?): {e}", param=param) from None
        return _orient(source, param, label), None, label, ()
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"the {param} must be a file path or a PIL image, got {type(source).__name__}", param=param)
    path = Path(source)
    data = _read_bytes(path, param)
    pil, notes = _decode(data, param, str(path))
    return pil, hashlib.sha256(data).hexdigest(), str(path), notes


def _read_bytes(path: Path, param: str) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INPUT_BYTES:
                raise UsageError(f"{param} file {path} is {size / 2**20:.1f} MiB; at most "
                                 f"{MAX_INPUT_BYTES // 2**20} MiB are accepted", param=param)
            data = f.read(MAX_INPUT_BYTES + 1)  # bounded even where st_size lies (pipes, /proc)
    except FileNotFoundError:
        raise UsageError(f"{param} file {path} does not exist", param=param) from None
    except IsADirectoryError:
        raise UsageError(f"{param} {path} is a directory, not an image file", param=param) from None
    except PermissionError:
        raise UsageError(f"{param} file {path} cannot be read (permission denied)", param=param) from None
    except OSError as e:
        raise UsageError(f"{param} file {path} cannot be read: {e.strerror or e}", param=param) from None
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{param} file {path} is larger than {MAX_INPUT_BYTES // 2**20} MiB", param=param)
    if not data:
        raise UsageError(f"{param} file {path} is empty", param=param)
    return data


def _decode(data: bytes, param: str, label: str):
    """File bytes -> (loaded PIL image, EXIF orientation applied, first frame; notes)."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():  # restored on exit: no filter outlives this call
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=_FORMATS)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UsageError(f"{param} file {label} claims a picture too large to decode ({e}); at most "
                             f"{MAX_INPUT_SIDE}x{MAX_INPUT_SIDE} pixels are accepted", param=param) from None
        except UnidentifiedImageError:
            raise UsageError(_unidentified(data, param, label), param=param) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise UsageError(f"{param} file {label} cannot be read (damaged or truncated header?): {e}", param=param) from None
    if img.format == "GIF":
        raise UsageError(f"{param} file {label} is a GIF; use {_ALLOWED} (GIFs are palette pictures, often "
                         "animated)", param=param)
    _check_size(img.size, param, label)  # before any pixel is decoded
    notes = ()
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        if img.format != "MPO":
            raise UsageError(f"{param} file {label} is an animated {img.format} ({frames} frames); give a still "
                             "picture", param=param)
        notes = (f"{label} is a multi-picture JPEG (MPO, {frames} pictures): the first one is used",)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UsageError(f"{param} file {label} could not be decoded (truncated or damaged?): {e}",
                         param=param) from None
    return _orient(img, param, label), notes


def _unidentified(data: bytes, param: str, label: str) -> str:
    for offset, magic, name in _SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            if name in ("PNG", "JPEG", "WebP"):
                return f"{param} file {label} looks like a {name} but cannot be read (damaged or truncated header)"
            return f"{param} file {label} is a {name} picture; use {_ALLOWED}"
    return f"{param} file {label} is not a picture zimage reads; use {_ALLOWED}"


def _check_size(size: tuple[int, int], param: str, label: str) -> None:
    w, h = size
    if w > MAX_INPUT_SIDE or h > MAX_INPUT_SIDE:
        raise UsageError(f"{param} {label} is {w}x{h} ({w * h / 1e6:.1f} MP); at most {MAX_INPUT_SIDE} pixels per "
                         f"side ({MAX_INPUT_SIDE * MAX_INPUT_SIDE / 1e6:.1f} MP) are accepted: scale it down "
                         "first", param=param)
    if w < 1 or h < 1:
        raise UsageError(f"{param} {label} is {w}x{h}: an empty picture", param=param)


def _orient(img, param: str, label: str):
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as e:
        raise UsageError(f"{param} {label} has damaged EXIF data: {e}", param=param) from None


def _has_alpha(img) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_8bit(img):
    """16-bit (and 32-bit integer) grayscale -> L, scaled (Pillow's convert would clip at 255)."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I"):
        arr = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), "L")
    return img


def _to_rgb(img):
    """-> (RGB image, notes): transparency composited on white, other modes converted."""
    return _flatten(img, "RGB", (255, 255, 255, 255), "transparency composited on white",
                    "converted from mode {mode} to RGB")


def _to_mask(img):
    """-> (L image, notes): transparency composited on black, colour converted to luma."""
    return _flatten(img, "L", (0, 0, 0, 255), "mask transparency composited on black (transparent = keep)",
                    "mask converted from mode {mode} to grayscale (L)")


def _flatten(img, mode: str, background, composited: str, converted: str):
    """-> (image in `mode`, notes): 8-bit, any transparency composited on `background` (RGBA), then converted."""
    from PIL import Image

    source, img = img.mode, _to_8bit(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            return Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert(mode), (composited,)
        return rgba.convert(mode), ()
    if source != mode:
        return img.convert(mode), (converted.format(mode=source),)
    return img, ()


def _pixel_hash(img) -> str:
    header = f"{img.mode} {img.width}x{img.height}\n".encode()
    return hashlib.sha256(header + img.tobytes()).hexdigest()


# ---------------------------------------------------------------- sizes


@dataclass(frozen=True)
class _Geometry:
    """How a picture of `src` pixels becomes `size`: the source `box` is resampled to `inner` pixels, which are
    placed at `offset` on the output canvas (fit pads around them)."""

    size: tuple[int, int]
    box: tuple[float, float, float, float]
    inner: tuple[int, int]
    offset: tuple[int, int] = (0, 0)


def _geometry(src: tuple[int, int], size: tuple[int, int], mode: str) -> _Geometry:
    w, h = src
    W, H = size
    if mode == "stretch":
        return _Geometry(size, (0, 0, w, h), size)
    if mode == "crop":  # the centred box of the output's aspect ratio, resampled to the output
        if w * H > W * h:  # source wider than the output
            bw = h * W / H
            return _Geometry(size, ((w - bw) / 2, 0, (w + bw) / 2, h), size)
        bh = w * H / W
        return _Geometry(size, (0, (h - bh) / 2, w, (h + bh) / 2), size)
    if mode == "fit":  # the whole source, scaled to fit inside, centred
        scale = min(W / w, H / h)
        inner = (min(W, max(1, round(w * scale))), min(H, max(1, round(h * scale))))
        return _Geometry(size, (0, 0, w, h), inner, ((W - inner[0]) // 2, (H - inner[1]) // 2))
    raise AssertionError(mode)


def _apply(img, g: _Geometry, pad_value=None):
    """Resample img by g; the padding (fit) repeats the edge pixels, or is `pad_value` (a mask's 0)."""
    import numpy as np
    from PIL import Image

    box_size = (g.box[2] - g.box[0], g.box[3] - g.box[1])
    if box_size == g.inner and all(float(v).is_integer() for v in g.box):
        region = img.crop(tuple(int(v) for v in g.box))  # no resampling: the same pixels
    else:
        region = img.resize(g.inner, Image.Resampling.LANCZOS, box=g.box)
    if g.inner == g.size:
        return region
    arr = np.asarray(region)
    (x, y), (W, H) = g.offset, g.size
    pads = ((y, H - y - arr.shape[0]), (x, W - x - arr.shape[1])) + ((0, 0),) * (arr.ndim - 2)
    if pad_value is None:
        arr = np.pad(arr, pads, mode="edge")
    else:
        arr = np.pad(arr, pads, mode="constant", constant_values=pad_value)
    return Image.fromarray(arr, img.mode)


def _default_size(image: InputImage) -> tuple[tuple[int, int], _Geometry | None, tuple[str, ...]]:
    """The picture's own size rounded down to a multiple of 16 (a centred crop), checked against 256..2048."""
    w, h = image.pixels.size
    W, H = w - w % SIZE_MULTIPLE, h - h % SIZE_MULTIPLE
    if not (MIN_SIDE <= W <= MAX_SIDE and MIN_SIDE <= H <= MAX_SIDE):
        raise UsageError(
            f"the image {image.source} is {w}x{h}; without a requested size the output keeps the image's size "
            f"rounded down to a multiple of {SIZE_MULTIPLE} ({W}x{H}), which must be {MIN_SIDE}..{MAX_SIDE} per "
            "side: give a width and height with resize fit, crop or stretch", param="image")
    if (W, H) == (w, h):
        return (W, H), None, ()
    x0, y0 = (w - W) // 2, (h - H) // 2
    note = (f"the image {image.source} is {w}x{h}, not a multiple of {SIZE_MULTIPLE}: kept its centre {W}x{H} "
            f"(cropped {x0} px left, {w - W - x0} right, {y0} top, {h - H - y0} bottom)")
    return (W, H), _Geometry((W, H), (x0, y0, x0 + W, y0 + H), (W, H)), (note,)


def check_mask_blur(px) -> int:
    if isinstance(px, bool) or not isinstance(px, int) or not 0 <= px <= MAX_MASK_BLUR:
        raise UsageError(f"mask blur must be a whole number of pixels from 0 to {MAX_MASK_BLUR}, got {px!r}",
                         param="mask_blur")
    return px


def prepare_inputs(image, mask=None, *, width: int | None = None, height: int | None = None,
                   resize: str | None = None, mask_blur: int = 0) -> tuple[InputImage, InputMask | None]:
    """The picture (and mask) at the size the model works at, by the rules of the module docstring.

    image/mask: a path, a PIL image, or an InputImage / InputMask (e.g. from outpaint). width/height: the
    requested output size (both or neither). resize: None or one of RESIZE_MODES. mask_blur: the radius in pixels
    of a Gaussian blur of the mask at the output size (diffusers' VaeImageProcessor.blur). The blurred mask is then
    binarised at 0.5 as the reference's mask processor does (mask_to_tensor), so the blur rounds corners, closes
    gaps and drops specks of about its radius: it smooths the outline, it does not feather the edge.
    A mask with nothing to repaint is an error.
    """
    img = image if isinstance(image, InputImage) else load_image(image)
    msk = None if mask is None else mask if isinstance(mask, InputMask) else load_mask(mask)
    if resize is not None and resize not in RESIZE_MODES:
        raise UsageError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}", param="resize")
    if (width is None) != (height is None):
        raise UsageError("give both width and height for an image input, or neither (to keep the image's size)",
                         param="width" if width is None else "height")
    blur = check_mask_blur(mask_blur)

    notes: tuple[str, ...] = ()
    if width is None:
        size, geom, notes = _default_size(img)
    else:
        size = (check_side("width", width), check_side("height", height))
        if img.pixels.size == size:
            geom = None
        elif resize is None:
            raise UsageError(
                f"the image {img.source} is {img.width}x{img.height} but the requested size is {size[0]}x{size[1]}: "
                "choose resize fit, crop or stretch, or leave out the size to keep the image's own (rounded down "
                f"to a multiple of {SIZE_MULTIPLE})", param="resize")
        else:
            geom = _geometry(img.pixels.size, size, resize)
            notes = (f"the image {img.source} ({img.width}x{img.height}) resized to {size[0]}x{size[1]} ({resize})",)
    out_img = img if geom is None else replace(img, pixels=_apply(img.pixels, geom), notes=img.notes + notes)
    if msk is None:
        return out_img, None

    if msk.pixels.size == img.pixels.size:
        mgeom = geom  # the very same crop/resample as the picture: aligned pixel for pixel
    elif resize is None:
        raise UsageError(f"the mask {msk.source} is {msk.width}x{msk.height} but the image is "
                         f"{img.width}x{img.height}: give a mask of the image's size (after EXIF orientation), or "
                         "choose a resize mode (fit, crop or stretch) to resize it too", param="mask")
    else:
        mgeom = _geometry(msk.pixels.size, size, resize)
    pixels = msk.pixels if mgeom is None else _apply(msk.pixels, mgeom, pad_value=0)
    mnotes = () if mgeom is None or mgeom is geom else (
        f"the mask {msk.source} ({msk.width}x{msk.height}) resized to {size[0]}x{size[1]} ({resize})",)
    if blur:
        from PIL import ImageFilter

        pixels = pixels.filter(ImageFilter.GaussianBlur(blur))
        mnotes += (f"mask blurred by {blur} px",)
    _check_repaints(pixels, msk.source)
    return out_img, replace(msk, pixels=pixels, notes=msk.notes + mnotes)


def _check_repaints(mask, label: str) -> None:
    import numpy as np

    white = np.asarray(mask) >= 128  # what binarising at 0.5 keeps as 1 (128/255 > 0.5 > 127/255)
    if not white.any():
        raise UsageError(f"the mask {label} is all black: nothing to repaint (white = repaint, black = keep)",
                         param="mask")
    if not white[::MASK_CELL, ::MASK_CELL].any():
        raise UsageError(
            f"the mask {label} has {int(white.sum())} white pixels, but none at the top-left pixel of an "
            f"{MASK_CELL}x{MASK_CELL} cell, where the model reads the mask: nothing would be repainted; paint a "
            f"larger area", param="mask")


# ---------------------------------------------------------------- outpainting


def parse_margins(text: str) -> tuple[int, int, int, int]:
    """'L,T,R,B' pixels (e.g. '0,0,256,0') -> (left, top, right, bottom)."""
    parts = str(text).split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"outpaint must be four whole numbers of pixels LEFT,TOP,RIGHT,BOTTOM (e.g. 0,0,256,0), "
                         f"got {text!r}", param="outpaint")
    left, top, right, bottom = (int(p) for p in parts)
    return left, top, right, bottom


def outpaint(image, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0, *,
             overlap: int = 0) -> tuple[InputImage, InputMask]:
    """Pad the picture's canvas by the given pixels per side -> (the padded picture, its mask).

    The new area is filled by repeating the edge pixels; the mask is white (repaint) there and `overlap` pixels
    into the picture along each padded side. The canvas must be a valid output size (multiples of 16, 256..2048).
    """
    img = image if isinstance(image, InputImage) else load_image(image)
    margins = (left, top, right, bottom)
    if any(isinstance(m, bool) or not isinstance(m, int) or m < 0 for m in margins) or not any(margins):
        raise UsageError(f"outpaint margins must be whole numbers of pixels >= 0, at least one > 0, got {margins}",
                         param="outpaint")
    w, h = img.pixels.size
    W, H = w + left + right, h + top + bottom
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= min(w, h) // 2:
        raise UsageError(f"outpaint overlap must be 0..{min(w, h) // 2} pixels for a {w}x{h} image, got {overlap!r}",
                         param="outpaint")
    try:
        check_side("width", W)
        check_side("height", H)
    except UsageError as e:
        raise UsageError(f"outpainting the {w}x{h} image by {left},{top},{right},{bottom} (left,top,right,bottom) "
                         f"gives a {W}x{H} canvas: {e}", param="outpaint") from None
    import numpy as np
    from PIL import Image

    canvas = _apply(img.pixels, _Geometry((W, H), (0, 0, w, h), (w, h), (left, top)))
    mask = np.full((H, W), 255, dtype=np.uint8)
    x0, y0 = left + (overlap if left else 0), top + (overlap if top else 0)
    x1, y1 = left + w - (overlap if right else 0), top + h - (overlap if bottom else 0)
    mask[y0:y1, x0:x1] = 0  # keep the picture, less the overlap along padded sides
    mask_img = Image.fromarray(mask, "L")
    note = (f"outpainted the {w}x{h} image to {W}x{H} ({left} px left, {top} top, {right} right, {bottom} bottom, "
            f"overlap {overlap}); the new area starts from repeated edge pixels")
    built = InputMask(mask_img, _pixel_hash(mask_img), f"<outpaint {left},{top},{right},{bottom}>", (W, H))
    return replace(img, pixels=canvas, notes=img.notes + (note,)), built


def expand_to(image, width: int, height: int, *, overlap: int = 0) -> tuple[InputImage, InputMask]:
    """Outpaint to a canvas of width x height with the picture centred (the odd pixel goes right/bottom)."""
    img = image if isinstance(image, InputImage) else load_image(image)
    w, h = img.pixels.size
    if isinstance(width, bool) or isinstance(height, bool) or not isinstance(width, int) or \
            not isinstance(height, int) or width < w or height < h or (width, height) == (w, h):
        raise UsageError(f"expand-to must be at least the image's size {w}x{h} and larger in one side, got "
                         f"{width}x{height} (to shrink it, use a resize mode)", param="expand_to")
    left, top = (width - w) // 2, (height - h) // 2
    return outpaint(img, left, top, width - w - left, height - h - top, overlap=overlap)


# ---------------------------------------------------------------- tensors


def image_to_tensor(pixels):
    """RGB PIL (W x H) -> (1, 3, H, W) float32 in [-1, 1]: x / 255 then 2x - 1, as VaeImageProcessor.preprocess.

    The memory layout is also the reference's: a permuted view of the (1, H, W, 3) array, i.e. channels_last
    strides. Convolutions pick their kernels by layout and round differently; on the tiny model a contiguous copy
    changes the VAE encoder's moments by ~1e-3, beyond the 1e-4 parity bound. Call .contiguous() to choose the
    other layout knowingly."""
    import numpy as np
    import torch

    arr = np.asarray(pixels.convert("RGB")).astype(np.float32) / 255.0  # (H, W, 3)
    return 2.0 * torch.from_numpy(arr[None].transpose(0, 3, 1, 2)) - 1.0  # (1, 3, H, W), strides (HW3, 1, 3W, 3)


def mask_to_tensor(pixels):
    """L PIL (W x H) -> (1, 1, H, W) float32 in {0, 1} (1 = repaint): x / 255, then < 0.5 -> 0 and >= 0.5 -> 1, as
    the inpainting pipeline's mask processor (do_convert_grayscale, do_normalize=False, do_binarize)."""
    import numpy as np
    import torch

    arr = np.asarray(pixels.convert("L")).astype(np.float32) / 255.0  # (H, W)
    mask = torch.from_numpy(arr)[None, None].contiguous()
    mask[mask < 0.5] = 0
    mask[mask >= 0.5] = 1
    return mask
