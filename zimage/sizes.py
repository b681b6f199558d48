"""Image sizes: the allowed range and the aspect presets the model was trained on.

The transformer patchifies 2x2 latent pixels and the VAE downsamples 8x, so a side must be a multiple of 16.
The presets are the 1024-class resolution buckets that the Z-Image demo offers (about one megapixel each).
"""

from zimage.errors import UsageError

SIZE_MULTIPLE = 16  # VAE factor 8 x patch size 2
MIN_SIDE = 256
MAX_SIDE = 2048

# aspect -> (width, height)
ASPECT_PRESETS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "4:3": (1152, 864),
    "3:4": (864, 1152),
    "3:2": (1248, 832),
    "2:3": (832, 1248),
    "16:9": (1280, 720),
    "9:16": (720, 1280),
    "21:9": (1344, 576),
    "9:21": (576, 1344),
}


def check_side(name: str, value: int) -> int:
    """Return `value` if it is a valid image side, else raise UsageError naming it and the rule."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}", param=name)
    if value % SIZE_MULTIPLE:
        lower = value - value % SIZE_MULTIPLE
        raise UsageError(
            f"{name} must be a multiple of {SIZE_MULTIPLE}, got {value} (nearest: {lower} or {lower + SIZE_MULTIPLE})",
            param=name,
        )
    if not MIN_SIDE <= value <= MAX_SIDE:
        raise UsageError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE}, got {value}", param=name)
    return value


def size_for_aspect(aspect: str) -> tuple[int, int]:
    """(width, height) of an aspect preset such as '16:9'."""
    try:
        return ASPECT_PRESETS[aspect]
    except KeyError:
        raise UsageError(
            f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECT_PRESETS)}", param="aspect"
        ) from None


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768), validated."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"size must look like WIDTHxHEIGHT (e.g. 1024x1024), got {text!r}", param="size")
    width, height = int(parts[0]), int(parts[1])
    return check_side("width", width), check_side("height", height)
