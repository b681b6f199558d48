"""A generation request: validated once, here, so that the engine and every entrypoint share one set of rules."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace

from zimage.errors import UsageError
from zimage.lora_spec import check_loras
from zimage.sizes import check_side

# Limits. The CLI, the server and the Python API all enforce these through GenerateRequest.
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
MAX_IMAGES_PER_PROMPT = 16
MAX_PROMPTS = 64
MAX_IMAGES_PER_REQUEST = 64
MAX_PROMPT_CHARS = 20_000  # a guard against abuse; token truncation (512) is reported separately
MAX_SEED = 2**63 - 1 - MAX_IMAGES_PER_REQUEST  # seed + i must stay a valid 64-bit seed

DEFAULT_SIZE = 1024
DEFAULT_IMG2IMG_STRENGTH = 0.6  # diffusers' ZImageImg2ImgPipeline docs example (8 steps -> 5 forwards)
DEFAULT_INPAINT_STRENGTH = 1.0  # its ZImageInpaintPipeline example: the masked area repainted from noise


def random_seed() -> int:
    return secrets.randbelow(2**32)


@dataclass(frozen=True)
class GenerateRequest:
    """What to make. Construct it and it is valid, or a UsageError says which field is wrong and why.

    Image i of a request (prompt-major: all n images of prompt 0, then prompt 1, ...) uses seed + i, drawn
    from its own CPU generator, so an image depends only on (prompt, settings, its seed), not on batching.
    """

    prompts: tuple[str, ...]  # one or more prompts; each yields `n` images
    negative_prompt: str = ""  # used only when guidance > 0 (classifier-free guidance)
    width: int | None = None  # pixels, multiple of 16 in [256, 2048]; None: 1024, or the input image's own size
    height: int | None = None
    steps: int | None = None  # transformer forwards (x2 with CFG); None: the model's recipe (zimage.recipe: 8 Turbo)
    guidance: float | None = None  # CFG scale, 0 = off (pred = pos + g * (pos - neg)); None: the recipe's (Turbo 0)
    seed: int | None = None  # None: a random seed, recorded in the result
    n: int = 1  # images per prompt
    loras: tuple = ()  # LoraSpec / 'NAME[:SCALE]': applied to this request's images (zimage.engine.loras)
    # Starting from a picture (zimage.io.input_image, zimage.engine.img2img): a path, a PIL image or an InputImage;
    # prepared here (decoded, checked, brought to the size), so that a bad file fails before any model work.
    image: object = field(default=None, compare=False)  # -> zimage.io.input_image.InputImage
    mask: object = field(default=None, compare=False)  # white = repaint (inpainting) -> InputMask
    strength: float | None = None  # (0, 1]: how much of the schedule runs; None: 0.6 for img2img, 1.0 with a mask
    resize: str | None = None  # fit | crop | stretch: how an image of another size meets width x height
    mask_blur: int = 0  # pixels: Gaussian blur of the mask's outline before it is binarised
    extra: dict = field(default_factory=dict, compare=False)  # free-form, carried into metadata (e.g. source)
    inputs_prepared: bool = field(default=False, compare=False, repr=False)  # set once image/mask are at the size

    def __post_init__(self):
        prompts = self.prompts
        if isinstance(prompts, str):
            prompts = (prompts,)
        if not isinstance(prompts, (tuple, list)) or not prompts:
            raise UsageError("at least one prompt is required", param="prompt")
        prompts = tuple(prompts)
        if len(prompts) > MAX_PROMPTS:
            raise UsageError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
        for i, p in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt {i + 1}"
            if not isinstance(p, str) or not p.strip():
                raise UsageError(f"{where} is empty; give a description of the image", param="prompt")
            if len(p) > MAX_PROMPT_CHARS:
                raise UsageError(f"{where} has {len(p)} characters; the limit is {MAX_PROMPT_CHARS}", param="prompt")
            _check_utf8(where, p, "prompt")
        object.__setattr__(self, "prompts", prompts)
        if not isinstance(self.negative_prompt, str):
            raise UsageError(f"negative prompt must be text, got {self.negative_prompt!r}", param="negative_prompt")
        if len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise UsageError(f"negative prompt is longer than {MAX_PROMPT_CHARS} characters", param="negative_prompt")
        _check_utf8("negative prompt", self.negative_prompt, "negative_prompt")
        self._prepare_image()
        check_side("width", self.width)
        check_side("height", self.height)
        if self.steps is not None:
            _check_int("steps", self.steps, 1, MAX_STEPS)
        if self.guidance is not None:
            g = self.guidance
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
                raise UsageError(f"guidance must be a number, got {g!r}", param="guidance")
            if not 0.0 <= g <= MAX_GUIDANCE:
                raise UsageError(f"guidance must be between 0 and {MAX_GUIDANCE}, got {g}", param="guidance")
            object.__setattr__(self, "guidance", float(g))
        _check_int("n", self.n, 1, MAX_IMAGES_PER_PROMPT)
        if len(prompts) * self.n > MAX_IMAGES_PER_REQUEST:
            raise UsageError(
                f"{len(prompts)} prompts x n={self.n} is {len(prompts) * self.n} images; the limit is "
                f"{MAX_IMAGES_PER_REQUEST} per request",
                param="n",
            )
        if self.seed is None:
            object.__setattr__(self, "seed", random_seed())
        else:
            _check_int("seed", self.seed, 0, MAX_SEED)
        object.__setattr__(self, "loras", check_loras(self.loras))

    def _prepare_image(self) -> None:
        """Size, image, mask and strength: without an image, the size defaults to 1024 and image-only fields are
        refused; with one, the picture (and mask) are loaded and brought to the size (zimage.io.input_image)."""
        if self.image is None:
            for name, value, unset in (("mask", self.mask, None), ("strength", self.strength, None),
                                       ("resize", self.resize, None), ("mask_blur", self.mask_blur, 0)):
                if value != unset:
                    raise UsageError(f"{name} needs an input image (image=...)", param=name)
            object.__setattr__(self, "width", DEFAULT_SIZE if self.width is None else self.width)
            object.__setattr__(self, "height", DEFAULT_SIZE if self.height is None else self.height)
            return
        from zimage.io.input_image import check_mask_blur, prepare_inputs

        if self.inputs_prepared:  # a copy (dataclasses.replace) of a prepared request: blurred once already
            image, mask = self.image, self.mask
            check_mask_blur(self.mask_blur)
        else:
            image, mask = prepare_inputs(self.image, self.mask, width=self.width, height=self.height,
                                         resize=self.resize, mask_blur=self.mask_blur)
        strength = (DEFAULT_INPAINT_STRENGTH if mask is not None else DEFAULT_IMG2IMG_STRENGTH) \
            if self.strength is None else check_strength(self.strength)
        for name, value in (("image", image), ("mask", mask), ("strength", strength), ("width", image.width),
                            ("height", image.height), ("inputs_prepared", True)):
            object.__setattr__(self, name, value)

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.n

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance runs (guidance > 0; a request not yet given its recipe's defaults: no)."""
        return bool(self.guidance)

    def with_recipe(self, recipe) -> "GenerateRequest":
        """This request with the steps and guidance it left unset taken from `recipe` (zimage.recipe.Recipe)."""
        if self.steps is not None and self.guidance is not None:
            return self
        return replace(self, steps=recipe.steps if self.steps is None else self.steps,
                       guidance=recipe.guidance if self.guidance is None else self.guidance)

    @property
    def negative_prompt_ignored(self) -> bool:
        """A negative prompt was given but guidance is 0, so it has no effect: entrypoints tell the user."""
        return bool(self.negative_prompt.strip()) and not self.cfg

    def image_prompts(self) -> list[str]:
        """The prompt of each image, prompt-major (p0 x n, p1 x n, ...)."""
        return [p for p in self.prompts for _ in range(self.n)]

    def batch_key(self) -> tuple:
        """Requests with equal keys can run in one engine batch (each keeps its own prompts, seeds, LoRAs, picture)."""
        return (self.width, self.height, self.steps, self.guidance, self.image is not None, self.strength,
                self.mask is not None)

    def image_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]

    def single(self, index: int) -> "GenerateRequest":
        """The one-image request that reproduces image `index` of this one."""
        return replace(self, prompts=(self.image_prompts()[index],), n=1, seed=self.image_seeds()[index])


def check_strength(strength) -> float:
    """strength as a float if 0 < strength <= 1, else UsageError naming it (NaN, 0, 1.5, a string)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise UsageError(f"strength must be a number in (0, 1], got {strength!r}", param="strength")
    s = float(strength)
    if math.isnan(s) or not 0.0 < s <= 1.0:
        raise UsageError(
            f"strength must be greater than 0 and at most 1 (1 = repaint from pure noise), got {strength!r}",
            param="strength",
        )
    return s


def _check_utf8(where: str, text: str, param: str) -> None:
    """Refuse text that has no UTF-8 form: lone surrogates. On Linux, command-line bytes that are not UTF-8 arrive as
    these (Python's surrogateescape), and JSON can spell them ("\\udcff"); the tokenizer and the PNG writer would
    fail on them only after the model has loaded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(
            f"{where} cannot be encoded as UTF-8: character {e.start + 1} is {text[e.start]!r}, a lone surrogate "
            "(what bytes that are not UTF-8 become on a command line); give the text in UTF-8",
            param=param,
        ) from None


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}", param=name)
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, got {value}", param=name)
