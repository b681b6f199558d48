"""Image bytes: the files a job produces, and the small previews its events carry."""

from __future__ import annotations

import base64
import io

DEFAULT_COMPRESSION = 10  # OpenAI's output_compression: percent of quality given up (jpeg/webp)
# zlib level of the PNGs the server makes. Measured on a 2-core machine (Pillow, a noisy 256x256 image: what the tiny
# random model makes): level 1 encodes in 11 ms against 59 ms at Pillow's default 6, for 16% more bytes (1024x1024:
# 229 against 274 ms, +9%). The server encodes every image on its CPU while clients wait; the CLI keeps level 6.
PNG_LEVEL = 1
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image, metadata, fmt: str, compression: int | None = None) -> bytes:
    """PIL image -> file bytes. PNGs carry the generation parameters (A1111 text + zimage JSON)."""
    if fmt == "png":
        from zimage.io.png import encode_png

        return encode_png(image, metadata, compress_level=PNG_LEVEL)
    quality = 100 - (DEFAULT_COMPRESSION if compression is None else compression)
    buf = io.BytesIO()
    image.save(buf, format="JPEG" if fmt == "jpeg" else "WEBP", quality=max(1, quality))
    return buf.getvalue()


def latent_preview(latents, max_side: int = 64) -> str:
    """A rough look at one image's latents (16, h, w) as a data URL: three channels, each normalised to 0..255.
    Not the decoded image (that needs the VAE): it shows composition emerging, at the cost of a few microseconds."""
    import torch
    from PIL import Image

    x = latents[:3].float()  # (3, h, w)
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-6) * 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # (h, w, 3)
    im = Image.fromarray(x, "RGB")
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
