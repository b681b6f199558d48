"""Flags shared by subcommands that load a model."""

from __future__ import annotations

from zimage.engine.config import DTYPE_CHOICES, SPEED_CHOICES
from zimage.recipe import BASE, RECIPE_CHOICES, TURBO
from zimage.weights.layout import DEFAULT_MODEL_ID


def add_model_flags(p) -> None:
    g = p.add_argument_group("model and device")
    g.add_argument("--model", default=DEFAULT_MODEL_ID,
                   help="folder in diffusers layout, a repo id looked up in the Hugging Face and ModelScope caches, "
                        "or 'tiny-random' (a tiny random stand-in: images are noise) (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    g.add_argument("--dtype", default="auto",
                   help=f"{' | '.join(DTYPE_CHOICES)}: auto is bf16 on GPUs that have it, fp16 on older GPUs, "
                        "fp32 on CPU")
    g.add_argument("--speed", default="auto", help=f"{' | '.join(SPEED_CHOICES)} (see README: Speed)")
    g.add_argument("--recipe", default="auto", choices=RECIPE_CHOICES,
                   help=f"the defaults of --steps and --guidance: turbo ({TURBO.steps} steps, guidance "
                        f"{TURBO.guidance:g}: Z-Image-Turbo) or base ({BASE.steps} steps, guidance {BASE.guidance:g}: "
                        "the non-distilled Z-Image); auto: by the model's repo id or scheduler (default: auto)")
    g.add_argument("--vram-budget", type=float, default=None, metavar="GIB",
                   help="GPU memory the plan may use (default: what is free, less a margin)")
    g.add_argument("--fp8", action="store_true",
                   help="lossy: store the transformer's matrices in fp8 (half its memory) and, on GPUs with FP8 "
                        "tensor cores (H100, H200, RTX 40xx), multiply in fp8 (faster); images change slightly")
    g.add_argument("--converted-cache", action="store_true",
                   help="keep a bf16 copy of the fp32 transformer in zimage's cache (12 GB of disk for the published "
                        "model, written on the first run) so that later starts read half the bytes; a copy whose "
                        "source files changed is never used")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                   help="apply a LoRA (repeatable): a .safetensors file or PEFT folder in any common layout "
                        "(diffusers/PEFT, kohya/musubi, ai-toolkit, DiffSynth, ComfyUI), merged into the weights "
                        "at load for every image (no cost per step); STRENGTH defaults to 1 (-10..10)")


def engine_config(args, show_progress: bool = True, expected_images: int | None = None, first=None):
    """EngineConfig from the flags; `first` (a GenerateRequest), when known before loading, is warmed up while the
    transformer loads (its prompts encoded, the decoder started at its size: zimage.engine.warm_start)."""
    from zimage.engine.config import EngineConfig

    warm = {}
    if first is not None:
        texts = list(first.image_prompts()) + ([first.negative_prompt] if first.cfg else [])
        warm = dict(warm_prompts=tuple(dict.fromkeys(texts)), warm_size=(first.width, first.height))
    return EngineConfig(model=args.model, device=args.device, dtype=args.dtype, speed=args.speed, recipe=args.recipe,
                        vram_budget_gib=args.vram_budget, fp8=args.fp8, show_progress=show_progress,
                        expected_images=expected_images, converted_cache=args.converted_cache,
                        loras=tuple(args.lora), **warm)
