"""POST /v1/images/edits: OpenAI's image edit API (multipart/form-data), as the official client sends it.

`image` (a file; the client sends `image[]` when given a list: one picture is accepted, more are refused), an
optional `mask` (a file; transparent = repaint when it has transparency, as OpenAI's masks, else white = repaint:
zimage/server/inputs.py), `prompt`, `n`, `size`, `response_format`, plus the open-server extensions (`seed`,
`num_inference_steps`, `guidance_scale`, `negative_prompt`) and the image ones (`strength`, `resize`, `mask_blur`).
The fields are validated by pydantic (EditForm), the pictures by zimage.io.input_image; the answer is
/v1/images/generations' ImageGenerationResponse. The body limit is settings.max_upload_bytes (guard.py, counted as
it streams), and the API key is checked before any byte of it is read.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import File, Form, Request, UploadFile
from pydantic import ConfigDict, Field

from zimage.errors import UsageError
from zimage.io.input_image import MAX_INPUT_BYTES, MAX_MASK_BLUR
from zimage.server.app import get_state
from zimage.server.inputs import EDITS_PATH, JobInputs, ResizeMode
from zimage.server.schemas import ImageGenerationResponse, JobCreate


class EditForm(JobCreate):
    """The form fields of an edit (the files are separate parameters)."""

    # Form fields arrive as text ("2", "0.5"): parsed as their types (not strict as JSON is). extra="ignore" since
    # FastAPI hands a form model every part, the files too; _check_fields refuses a misspelt one instead.
    model_config = ConfigDict(extra="ignore", strict=False)

    size: str = Field("auto", description="WIDTHxHEIGHT (multiples of 16 in 256..2048), or 'auto': the picture's "
                                          "own size rounded down to a multiple of 16.", examples=["1024x1024"])
    strength: float | None = Field(None, gt=0, le=1, description="How much of the schedule runs (1 = repaint "
                                   "from noise); default 0.6, or 1.0 with a mask.")
    resize: ResizeMode | None = Field(None, description="How a picture of another size meets `size`: fit (pad), "
                                      "crop (centre) or stretch.")
    mask_blur: int = Field(0, ge=0, le=MAX_MASK_BLUR, description="Blur of the mask's outline in pixels.")
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="Images inline, or as URLs.")
    model: str | None = Field(None, description="Accepted for compatibility; this server serves one model.")
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; logged only.")


def add_edits_route(router, responses: dict, submit, respond) -> None:
    """Registers the route on `router` (routes.build_router). `submit(state, body, inputs)` stores and queues a
    job; `respond(state, job, body, request)` awaits it and builds the answer (routes._submit, images_response)."""

    @router.post(EDITS_PATH, response_model=ImageGenerationResponse, tags=["openai"],
                 response_model_exclude_none=True, responses=responses)
    async def edits(request: Request, form: Annotated[EditForm, Form()],
                    image: Annotated[list[UploadFile] | None, File(description="The picture (PNG, JPEG or WebP, at "
                                                                   "most 25 MiB, 4096 px a side).")] = None,
                    images: Annotated[list[UploadFile] | None, File(alias="image[]", description="The picture, as "
                                      "OpenAI's client sends a list (one is accepted).")] = None,
                    mask: Annotated[UploadFile | None, File(description="Inpainting mask: transparent = repaint "
                                    "if it has transparency (OpenAI's), else white = repaint.")] = None):
        """OpenAI's image edits: img2img from `image`, inpainting with `mask`. Stored as a job and awaited, as
        /v1/images/generations (a client that disconnects cancels it)."""
        state = get_state(request)
        _check_fields(await request.form())  # (parsed once: FastAPI's own, cached on the request)
        picture = _one_picture([*(image or []), *(images or [])])
        inputs = JobInputs(await _read(picture, "image"), await _read(mask, "mask") if mask is not None else None,
                           form.strength, form.resize, form.mask_blur)
        job = await submit(state, form, inputs)
        return await respond(state, job, form, request)


FILE_FIELDS = ("image", "image[]", "mask")


def _check_fields(form) -> None:
    known = set(EditForm.model_fields) | set(FILE_FIELDS)
    for name in form.keys():
        if name not in known:
            raise UsageError(f"{name}: unknown field; an edit takes {', '.join(sorted(known))}", param=name)


def _one_picture(files: list) -> UploadFile:
    if not files:
        raise UsageError("image is required: the picture to edit, a file in the multipart form", param="image")
    if len(files) > 1:
        raise UsageError(f"one image per edit is accepted, got {len(files)} (in image / image[])", param="image")
    return files[0]


async def _read(upload, param: str) -> bytes:
    """The file's bytes, read at most one byte past the per-file limit (input_image names the limit)."""
    from starlette.datastructures import UploadFile as ParsedFile  # what the parser makes (FastAPI's subclasses it)

    if not isinstance(upload, ParsedFile):  # a plain text field where a file belongs
        raise UsageError(f"{param} must be a file in the multipart form", param=param)
    return await upload.read(MAX_INPUT_BYTES + 1)
