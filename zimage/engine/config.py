"""How to build an engine. One dataclass, one source of defaults."""

from __future__ import annotations

from dataclasses import dataclass

from zimage.lora_spec import check_loras
from zimage.memory.select import check_budget
from zimage.recipe import recipe_named
from zimage.speed.modes import SPEED_CHOICES
from zimage.weights.layout import DEFAULT_MODEL_ID

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" is accepted too
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
MAX_LORA_SLOTS = 16  # distinct runtime LoRA sets per batch (each slot costs memory: zimage.engine.loras)
MAX_LORA_RANK = 1024
__all__ = ["DEVICE_CHOICES", "DTYPE_CHOICES", "SPEED_CHOICES", "EngineConfig"]


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL_ID  # folder, repo id (looked up in the HF / ModelScope caches) or "tiny-random"
    device: str = "auto"  # auto: cuda if present, else mps, else cpu
    dtype: str = "auto"  # auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU
    speed: str = "auto"  # auto | eager | compile: see zimage.speed.apply (auto picks per device, measured)
    compile_cache: bool = True  # compiled speed: load / save the portable compile artifacts in zimage's cache, so
    # a later process skips code generation (zimage.speed.compile_cache); ZIMAGE_COMPILE_CACHE=0 turns it off too
    recipe: str = "auto"  # auto | turbo | base: the defaults of steps and guidance (zimage.recipe); auto: by the model
    expected_images: int | None = None  # how many images this process will make (None: many, e.g. a server)
    vram_budget_gib: float | None = None  # memory plan budget; None: free VRAM less a margin (zimage.memory)
    fp8: bool = False  # opt-in, LOSSY: transformer matrices stored in fp8 (half the memory); on GPUs with FP8
    # tensor cores (compute capability >= 8.9) their products also run in fp8 (zimage.speed.fp8)
    max_text_tokens: int = 512  # the text encoder reads at most this many tokens per prompt (model limit)
    prompt_cache_size: int = 32  # prompt embeddings kept, so a repeated prompt skips the text encoder
    converted_cache: bool = False  # keep a copy of the weights in the compute dtype (bf16) in zimage's cache, tied
    # to the source files by size/mtime/header hash (zimage.weights.converted); off until measured worth it
    warm_prompts: tuple[str, ...] = ()  # prompts to encode while the transformer loads (the CLI passes its first
    # ones): their embeddings are cached before the first generate (zimage.engine.warm_start)
    warm_size: tuple[int, int] | None = None  # (width, height) of the first image: the VAE decoder starts up at it
    # while the transformer loads (eager speed)
    show_progress: bool = False  # tqdm bars for loading and steps (the CLI turns them on)
    # LoRA (zimage.engine.loras)
    loras: tuple = ()  # LoraSpec / 'NAME[:SCALE]': merged into the weights at load, for every image (CLI --lora)
    lora_dir: str | None = None  # where bare LoRA names are looked up (serve --lora-dir)
    lora_slots: int = 0  # > 0: per-request LoRA sets at runtime, this many distinct sets per batch (0: merged only)
    lora_rank: int = 64  # runtime slots' rank: a set's ranks summed must fit (lower ranks are padded with zeros)
    lora_names_only: bool = False  # requests may name only LoRAs in lora_dir, never a path (a server's clients)

    def __post_init__(self):
        """Values that can be checked without a device are checked here, before anything loads."""
        from zimage.errors import UsageError

        if self.speed not in SPEED_CHOICES:
            raise UsageError(f"unknown speed mode {self.speed!r}; choose one of {', '.join(SPEED_CHOICES)}",
                             param="speed")
        if self.dtype not in DTYPE_CHOICES:
            raise UsageError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}", param="dtype")
        check_budget(self.vram_budget_gib)
        recipe_named(self.recipe)
        object.__setattr__(self, "loras", check_loras(self.loras))
        for name, value, low, high in (("lora_slots", self.lora_slots, 0, MAX_LORA_SLOTS),
                                       ("lora_rank", self.lora_rank, 1, MAX_LORA_RANK)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UsageError(f"{name} must be an integer between {low} and {high}, got {value!r}",
                                 param=name.replace("_", "-"))
