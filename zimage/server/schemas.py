"""Request and response models (pydantic v2). A request is converted once, here, into a GenerateRequest; the
limits themselves live in zimage.request / zimage.sizes (one set of rules for CLI, API and server)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from zimage.errors import UsageError
from zimage.lora_spec import MAX_LORAS, MAX_SCALE, LoraSpec
from zimage.request import (
    MAX_GUIDANCE, MAX_IMAGES_PER_PROMPT, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, GenerateRequest,
)
from zimage.server.size_text import SIZE_PATTERN, parse_size_text

OutputFormat = Literal["png", "jpeg", "webp"]


class LoraRef(BaseModel):
    """A LoRA a request applies to its images: a name from GET /v1/loras (the server's --lora-dir), never a path."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(..., min_length=1, max_length=255, description="A name listed by GET /v1/loras (the file "
                                                                      "name without .safetensors).")
    scale: float = Field(1.0, ge=-MAX_SCALE, le=MAX_SCALE, allow_inf_nan=False,
                         description="Strength: the update is scale x the file's own alpha/rank scaling.")


class JobCreate(BaseModel):
    """What to generate. Field names follow OpenAI's images API plus the extensions open servers use."""

    # A misspelt field is an error, not silently ignored; and types are strict: `n: true`, `n: "1"`,
    # `num_inference_steps: 55.0` are refused, not coerced (an integer is still accepted where a number is asked).
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS, description="What the image shows.")
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                                 description="What to avoid; used only when guidance_scale > 0.")
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_PROMPT, description="Number of images (seeds seed, seed+1, ...).")
    size: str = Field("auto", description="WIDTHxHEIGHT in pixels, each a multiple of 16 in 256..2048, "
                                          "or 'auto' for the server's default size.", examples=["1024x1024"],
                      # documented, checked in to_engine (parse_size_text), whose message names the rule broken
                      json_schema_extra={"pattern": f"^auto$|{SIZE_PATTERN}"})
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed of the first image; omitted: random "
                                                                  "(the seed used is reported).")
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                                            description="Denoising steps (transformer forwards); omitted: the "
                                                        "model's recipe (8 for Z-Image-Turbo).")
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE,
                                         description="Classifier-free guidance, 0 disables it; omitted: the model's "
                                                     "recipe (0 for Z-Image-Turbo).")
    loras: list[LoraRef] = Field([], max_length=MAX_LORAS,
                                 description="LoRAs for these images, by name (GET /v1/loras); needs a server "
                                             "started with --lora-dir. Each name at most once.")
    output_format: OutputFormat = Field("png", description="Image file format. PNGs carry the parameters.")
    output_compression: int | None = Field(None, ge=0, le=100,
                                           description="jpeg/webp quality loss in percent (OpenAI's meaning: "
                                                       "0 = best quality); default 10.")

    def to_engine(self, default_size: tuple[int, int], default_steps: int | None = None) -> GenerateRequest:
        """The validated engine request; raises zimage.errors.UsageError (-> 400) naming the field. Steps and
        guidance left None (no client value, no server default) are the engine's recipe's (Engine.generate_many)."""
        width, height = default_size if self.size == "auto" else parse_size_text(self.size)
        steps = self.num_inference_steps if self.num_inference_steps is not None else default_steps
        return GenerateRequest(
            prompts=(self.prompt,), negative_prompt=self.negative_prompt, width=width, height=height,
            steps=steps, guidance=self.guidance_scale, seed=self.seed, n=self.n,
            loras=tuple(LoraSpec(lora.name, lora.scale) for lora in self.loras),
        )


class ImageGenerationRequest(JobCreate):
    """OpenAI's `POST /v1/images/generations` body (the official client sends it unchanged)."""

    model: str | None = Field(None, description="Accepted for compatibility; this server serves one model.")
    response_format: Literal["b64_json", "url"] = Field("b64_json", description="Images inline, or as URLs.")
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; logged only.")
    # OpenAI's parameters for its gpt-image models, which the official client passes on when given.
    stream: bool | None = Field(None, description="Send OpenAI's image streaming events (server-sent events): "
                                                  "partial images, then one image_generation.completed per image.")
    partial_images: int | None = Field(None, ge=0, le=3, description="With stream: at most this many step previews "
                                       "(small JPEGs of the latents) as image_generation.partial_image events.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto and opaque are accepted; transparent is refused (the model makes opaque images).")
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = Field(
        None, description="Accepted and ignored: quality follows num_inference_steps (echoed in stream events).")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted and ignored (no style control).")
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted and ignored: this server runs "
                                                                         "no moderation.")

    def check_openai_options(self) -> None:
        """The combinations that cannot be honoured, as a UsageError (400) naming the field and why."""
        if self.background == "transparent":
            raise UsageError("background 'transparent' is not possible: Z-Image makes opaque RGB images (use "
                             "'auto' or 'opaque')", param="background")
        if self.stream and self.response_format == "url" and "response_format" in self.model_fields_set:
            raise UsageError("response_format 'url' cannot be streamed: stream events carry the image as b64_json",
                             param="response_format")
        if self.partial_images and not self.stream:
            raise UsageError("partial_images needs stream: true (partial images are sent only as stream events)",
                             param="partial_images")


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="The image file, base64 (response_format b64_json).")
    url: str | None = Field(None, description="Where to GET the image file (response_format url).")
    revised_prompt: str | None = Field(None, description="The prompt as used (unchanged: no rewriting).")
    seed: int = Field(..., description="The seed that made this image.")


class ImageGenerationResponse(BaseModel):
    created: int = Field(..., description="Unix time in seconds.")
    data: list[ImageData]
    output_format: OutputFormat
    size: str = Field(..., description="WIDTHxHEIGHT of the images.")
    warnings: list[str] | None = Field(None, description="Extension: what of the request had no effect, and why "
                                                         "(omitted when nothing).")


def request_warnings(params: dict) -> list[str]:
    """What of a stored request has no effect, said rather than silently dropped."""
    warnings = []
    if params.get("negative_prompt") and not params.get("guidance"):
        warnings.append("negative_prompt is ignored: it is used only with classifier-free guidance "
                        "(guidance_scale > 0), and guidance_scale is 0")
    return warnings


class JobImage(BaseModel):
    id: str = Field(..., description="Image id; the file is at `url`.")
    url: str
    index: int = Field(..., description="Position in the job (0-based).")
    seed: int


class JobParams(BaseModel):
    """The request as it will run: the size resolved, the seed drawn (so a re-run makes the same images)."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int | None = Field(..., description="None: the model's recipe (shown resolved once the model is loaded).")
    guidance: float | None = Field(..., description="None: the model's recipe, as steps.")
    seed: int
    n: int
    output_format: OutputFormat
    output_compression: int | None = None
    loras: list[LoraRef] = Field([], description="The request's LoRAs, by name, with their strengths.")
    # starting from a picture (zimage/server/inputs.py): the hashes of the files, not the files
    image_sha256: str | None = Field(None, description="SHA-256 of the input picture's file (img2img, edits).")
    mask_sha256: str | None = Field(None, description="SHA-256 of the mask's file (inpainting).")
    strength: float | None = None
    resize: str | None = None
    mask_blur: int | None = None
    size_from_image: bool | None = Field(None, description="The size was the picture's own (size 'auto').")


class JobProgress(BaseModel):
    phase: str = Field(..., description="encode | denoise | decode")
    step: int
    total: int


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class Job(BaseModel):
    id: str
    object: Literal["job"] = "job"
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created: float = Field(..., description="Unix time, seconds.")
    started: float | None = None
    finished: float | None = None
    attempts: int = Field(..., description="Times a run was started (more than 1 after a server restart).")
    position: int | None = Field(None, description="Place in the queue (0 = next), while queued.")
    progress: JobProgress | None = None
    params: JobParams
    images: list[JobImage] = []
    error: ErrorInfo | None = None
    warnings: list[str] = Field([], description="What of the request had no effect, and why.")


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Job]


class ErrorBody(BaseModel):
    error: ErrorInfo


class Health(BaseModel):
    status: Literal["ok", "loading", "failed"] = Field(..., description="ok: jobs run; loading (or warming up): "
                                                       "jobs are accepted and run once ready; failed: no job can run")
    detail: str | None = Field(None, description="A few words on the state (the cause is in the server log).")
    queue: int = Field(0, description="Jobs waiting.")
    running: int = Field(0, description="Jobs in the batch now running.")


class ServerStatus(Health):
    error: str | None = Field(None, description="Why the server failed (exception type and message).")
    engine: dict | None = Field(None, description="The loaded engine: model, path, device, dtype, memory plan, "
                                                  "speed.")
    version: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "zimage"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
