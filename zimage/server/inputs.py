"""Pictures sent to the server (img2img, inpainting): decoding them, keeping them with their job, the body limits.

The rules a picture or mask must meet are zimage.io.input_image's (formats, 25 MiB per file, 4096 px per side,
decompression bombs, animations, truncated files, mask size, an all-black mask): the bytes are handed to it, and
everything is checked while the engine request is built, before anything is stored.

Mask convention, one rule for the whole server (/v1/images/edits and /v1/jobs): a mask with transparent pixels is
read as OpenAI defines its masks, transparent = repaint (the alpha channel is the mask, the colours are ignored); a
mask without transparency is read as zimage's, white = repaint, black = keep. So OpenAI's alpha-PNG masks and
zimage's (and most tools') black-and-white masks both mean what their authors meant.

Where the input bytes are kept: in the store's image location (the images directory, or the --images-url fsspec
URL, through ImageFiles), as `input-<sha256>` files, written atomically before the job is committed: a committed job
always finds its picture, and a crash and restart re-runs it with the very same bytes. Not in the database: a job
row stays small (the params record only the sha256 of the picture and of the mask), and SQLite and PostgreSQL both
hold 50 MiB of blobs per job badly. Content addressing makes a re-sent picture one file. (Retention does not yet
delete input files with their jobs: see docs/server.md, "Image inputs".)
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass, replace
from typing import Literal

from pydantic import Field

from zimage.errors import UsageError
from zimage.io.input_image import MAX_INPUT_BYTES, MAX_MASK_BLUR, load_image_bytes, load_mask_bytes
from zimage.request import GenerateRequest
from zimage.server.schemas import JobCreate

EDITS_PATH = "/v1/images/edits"
JOBS_PATH = "/v1/jobs"
INPUT_NAME = re.compile(r"^input-[0-9a-f]{64}$")
_DATA_URL = re.compile(r"^data:image/[a-z0-9.+-]+;base64,", re.IGNORECASE)
ResizeMode = Literal["fit", "crop", "stretch"]


def base64_length(nbytes: int) -> int:
    return 4 * math.ceil(nbytes / 3)


def upload_limits(settings) -> dict[str, int]:
    """Body limits by path (guard.py): multipart edits take two files and their fields within max_upload_bytes;
    a JSON job carries them as base64, 4/3 of the bytes."""
    return {EDITS_PATH: settings.max_upload_bytes, JOBS_PATH: base64_length(settings.max_upload_bytes)}


def input_name(sha256: str) -> str:
    name = f"input-{sha256}"
    assert INPUT_NAME.match(name)  # a digest we computed, never a name from the request
    return name


def decode_base64(text: str, param: str) -> bytes:
    """Base64 (line breaks allowed, as `base64` writes it) or a data: URL (data:image/png;base64,...) -> bytes."""
    body = _DATA_URL.sub("", text, count=1)
    if body.startswith("data:"):
        raise UsageError(f"{param}: a data: URL must be data:image/<type>;base64,<data>", param=param)
    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{param} is not valid base64 (give the file's bytes in base64, or a data:image/...;base64, "
                         "URL)", param=param) from None


@dataclass(frozen=True)
class JobInputs:
    """The pictures of one request, as uploaded, and how to use them."""

    image: bytes | None
    mask: bytes | None = None
    strength: float | None = None  # None: the engine's default (0.6 img2img, 1.0 with a mask)
    resize: str | None = None
    mask_blur: int = 0

    def apply(self, req: GenerateRequest, size: str) -> GenerateRequest:
        """`req` (made by JobCreate.to_engine) starting from the pictures: decoded and checked here (UsageError ->
        400 naming image, mask, strength...). size 'auto': the picture's own size (rounded down to 16)."""
        image = None if self.image is None else load_image_bytes(self.image, "(upload)", "image")
        mask = None if self.mask is None else load_mask_bytes(self.mask, "(upload)", "mask", transparent_repaints=True)
        auto = size == "auto"
        return replace(req, image=image, mask=mask, strength=self.strength, resize=self.resize,
                       mask_blur=self.mask_blur, width=None if auto else req.width,
                       height=None if auto else req.height)

    def params(self, req: GenerateRequest, size: str) -> dict:
        """What the job records (hashes, not bytes), enough with the stored files to build the request again."""
        return {"image_sha256": req.image.sha256, "mask_sha256": req.mask.sha256 if req.mask is not None else None,
                "strength": req.strength, "resize": req.resize, "mask_blur": req.mask_blur,
                "size_from_image": size == "auto"}

    def save(self, store) -> None:
        """Before the job is committed (worker thread: file I/O)."""
        for data in (self.image, self.mask):
            if data is not None:
                from hashlib import sha256

                # Written even when present (content-addressed: the same bytes): the fresh write time keeps
                # retention from removing it before this job's row names it (remove_unused_inputs' grace period).
                store.files.write(input_name(sha256(data).hexdigest()), data)


def with_stored_inputs(req: GenerateRequest, params: dict, store) -> GenerateRequest:
    """A stored job's request with its pictures read back from the store (after a restart). UsageError if a file
    is gone."""
    def read(key: str, param: str) -> bytes | None:
        if params.get(key) is None:
            return None
        data = store.files.read(input_name(params[key]))
        if data is None:
            raise UsageError(f"the job's {param} ({input_name(params[key])}) is no longer in the store at "
                             f"{store.images_url}", param=param)
        return data

    inputs = JobInputs(read("image_sha256", "image"), read("mask_sha256", "mask"), params["strength"],
                       params["resize"], params["mask_blur"])
    size = "auto" if params.get("size_from_image") else f"{req.width}x{req.height}"
    return inputs.apply(req, size)


class ImageJobCreate(JobCreate):
    """POST /v1/jobs: JobCreate, optionally starting from a picture (img2img) and a mask (inpainting), base64."""

    image: str | None = Field(None, max_length=base64_length(MAX_INPUT_BYTES) + 4096,
                              description="Start from this picture (PNG, JPEG or WebP), base64 or a "
                                          "data:image/...;base64, URL. size 'auto' (the default) keeps its size.")
    mask: str | None = Field(None, max_length=base64_length(MAX_INPUT_BYTES) + 4096,
                             description="Inpainting mask, base64: transparent = repaint if it has transparency "
                                         "(OpenAI's convention), else white = repaint. Needs image.")
    strength: float | None = Field(None, gt=0, le=1, description="How much of the schedule runs (1 = repaint from "
                                   "noise); default 0.6, or 1.0 with a mask. Needs image.")
    resize: ResizeMode | None = Field(None, description="How a picture of another size meets `size`: fit (pad), "
                                      "crop (centre) or stretch. Needs image.")
    mask_blur: int = Field(0, ge=0, le=MAX_MASK_BLUR, description="Blur of the mask's outline in pixels.")

    def inputs(self) -> JobInputs | None:
        """None for a text-only job. Image-only fields without an image are refused by GenerateRequest (400)."""
        if self.image is None and self.mask is None and self.strength is None and self.resize is None \
                and not self.mask_blur:
            return None
        image = None if self.image is None else decode_base64(self.image, "image")
        mask = None if self.mask is None else decode_base64(self.mask, "mask")
        return JobInputs(image, mask, self.strength, self.resize, self.mask_blur)
