"""How an Engine is assembled: one ordered pipeline, each step a function with explicit inputs and outputs.

    target -> locate -> check -> plan -> read -> transform weights -> Engine.place (place, speed, guards)

- target:    device and dtype from the config (zimage.engine.device)
- locate:    the model folder: a path, the Hugging Face or ModelScope cache, tiny-random (zimage.weights.locate)
- check:     every part present and well formed, names and shapes matched, before any data is read (weights.check)
- plan:      the fastest memory plan within the VRAM budget (zimage.memory); `zimage plan` and `info` use it too
- read:      each network straight to where the plan keeps it, the first image's start-up work meanwhile
             (zimage.weights.load, zimage.engine.warm_start)
- transform: weight transforms, in their order: merged LoRAs (exact fp32 sums; zimage.engine.loras), fp8
             quantisation (the user's lossy choice; zimage.speed.fp8), runtime LoRA slots (per-request sets)
- place:     Engine.place(plan): the policy moves the networks, speed is applied for that placement, then the fp16
             guard. The same method re-places after an out-of-memory fallback or a weight change.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from zimage.engine.config import EngineConfig
from zimage.engine.progress import progress_bar

log = logging.getLogger("zimage")

PLAN_WIDTH = PLAN_HEIGHT = 1024  # the image a plan is made for unless told otherwise
PLAN_BATCH = 1


@dataclass(frozen=True)
class Target:
    device: object  # torch.device where compute runs
    dtype: object  # compute dtype of the transformer and the text encoder
    vae_dtype: object  # the VAE's: fp32 where the compute dtype is fp16 (the VAE overflows in fp16)


@dataclass
class Networks:
    """What `read` produced: the three networks, and the small parts read beside them."""

    transformer: object  # zimage.models.z_image.ZImageTransformer
    text_encoder: object  # zimage.models.qwen3.Qwen3TextEncoder
    vae: object  # zimage.models.vae.VAEDecoder
    prompts: object  # zimage.engine.text.PromptEncoder (tokenizer + text encoder + embedding cache)
    scheduler: object  # zimage.engine.sampling.FlowMatchConfig


def resolve_target(config: EngineConfig) -> Target:
    import torch

    from zimage.engine.device import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    return Target(device, dtype, torch.float32 if dtype == torch.float16 else dtype)


def plan_memory(config: EngineConfig, target: Target, sizes, width: int = PLAN_WIDTH, height: int = PLAN_HEIGHT,
                batch: int = PLAN_BATCH):
    """The MemoryPlan the engine uses on `target` for `sizes` (zimage.memory.sizes.ModelSizes): the fastest that
    fits the budget on CUDA; everything resident elsewhere (a budget names GPU memory). One path for the engine,
    `zimage plan` and `zimage info`."""
    from zimage.memory.select import budget_bytes, plan_for

    gpu = target.device.type == "cuda"
    budget = budget_bytes(config.vram_budget_gib, target.device) if gpu else None
    return plan_for(sizes, budget, width, height, batch, config.fp8)


def model_sizes_of(checked: dict, target: Target, config: EngineConfig):
    from zimage.memory.sizes import model_sizes

    return model_sizes(checked, target.dtype.itemsize, config.max_text_tokens)


def planning_target(config: EngineConfig) -> Target:
    """The target a plan is shown for (`zimage plan`, `zimage info`): the engine's, except that `--device auto` on a
    machine without a GPU plans for a CUDA GPU (what the plan is for: the machine that will run it), in the dtype
    asked for (auto: bf16; with fp16 the VAE runs in fp32, as resolve_target does)."""
    import torch

    if config.device == "auto" and not torch.cuda.is_available():
        table = {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if config.dtype not in table:
            from zimage.engine.device import resolve_dtype

            resolve_dtype(config.dtype, torch.device("cpu"))  # raises the engine's own error naming the choices
        dtype = table[config.dtype]
        return Target(torch.device("cuda"), dtype, torch.float32 if dtype == torch.float16 else dtype)
    return resolve_target(config)


def planning_sizes(config: EngineConfig, target: Target):
    """(ModelSizes, where they come from) for showing a plan: the model folder's headers when it is found, else the
    published Z-Image-Turbo shapes (`--model published` asks for those directly)."""
    from zimage.errors import ModelNotFoundError
    from zimage.memory.sizes import published_model_sizes
    from zimage.weights.check import check_model_folder
    from zimage.weights.locate import locate_model

    published = "the published Z-Image-Turbo shapes"
    if config.model != "published":
        try:
            location = locate_model(config.model)
        except ModelNotFoundError:
            published += f" ({config.model} is not on this machine)"
        else:
            return model_sizes_of(check_model_folder(location.path), target, config), str(location.path)
    return published_model_sizes(target.dtype.itemsize), published


def read(config: EngineConfig, target: Target, location, checked: dict, plan) -> Networks:
    """Load each network to where `plan` keeps it (the device, or host memory to stream from). The VAE first; then a
    loader thread reads the text encoder and the transformer while this thread, the one that will generate, does
    the first image's start-up work (zimage.engine.warm_start)."""
    from zimage.engine.sampling import FlowMatchConfig
    from zimage.engine.text import PromptEncoder
    from zimage.memory.planned import home
    from zimage.models.tokenizer import PromptTokenizer
    from zimage.weights.load import load_network

    tokenizer = PromptTokenizer.from_folder(location.path / "tokenizer")
    scheduler = FlowMatchConfig.from_file(location.path / "scheduler" / "scheduler_config.json")
    log.debug("tokenizer and scheduler read")
    device, dtype, conv = target.device, target.dtype, config.converted_cache
    bar = progress_bar(config.show_progress, sum(c.nbytes for c in checked.values()), f"loading {location.model_id}")
    step = bar.update if bar else None
    try:
        vae = load_network(checked["vae"], home(plan, "vae", device), target.vae_dtype, step)
        text_ready: Future = Future()

        def read_the_rest():
            try:
                text_ready.set_result(load_network(checked["text_encoder"], home(plan, "text_encoder", device),
                                                   dtype, step, conv))
            except BaseException as e:
                text_ready.set_exception(e)
                raise
            return load_network(checked["transformer"], home(plan, "transformer", device), dtype, step, conv)

        with ThreadPoolExecutor(1, thread_name_prefix="zimage-loader") as loader:
            transformer_ready = loader.submit(read_the_rest)
            warm = _plan_warm_start(config, target, plan, checked, tokenizer, vae)
            if warm is not None:
                warm.before_text_encoder()
            text_encoder = text_ready.result()
            prompts = PromptEncoder(tokenizer, text_encoder, device, config.max_text_tokens, config.prompt_cache_size)
            if warm is not None:
                warm.with_text_encoder(prompts)
            transformer = transformer_ready.result()
    finally:
        if bar:
            bar.close()
    return Networks(transformer, text_encoder, vae, prompts, scheduler)


def lora_state(config: EngineConfig, target: Target, checked: dict):
    """The engine's LoRA state (zimage.engine.loras.EngineLoras) on the checked networks, with the merged set's files
    read and checked against their shapes: a bad LoRA is refused before any weight is read."""
    from zimage.engine.loras import EngineLoras, LoraLibrary

    networks = {"transformer": checked["transformer"].network.module,
                "text_encoder": checked["text_encoder"].network.module}  # on meta now; the same modules once read
    loras = EngineLoras(LoraLibrary(config.lora_dir), networks, checked, target.dtype)
    loras.resolve(config.loras)
    return loras


def plan_sizes(config: EngineConfig, target: Target, checked: dict):
    """The ModelSizes plans are made from: the folder's tensors, plus the runtime LoRA slots when enabled."""
    from zimage.engine.loras import slot_bytes
    from zimage.memory.sizes import with_extra_transformer_bytes
    from zimage.speed.modes import resolve_speed

    sizes = model_sizes_of(checked, target, config)
    if config.lora_slots:
        # Compiled, the resident bf16 plan widens the blocks' LoRA layers (zimage.speed.lora_wide); counted for any
        # compiling engine, before the plan is known (fp8 and streamed plans, which do not widen, are over-counted).
        compiled = resolve_speed(config.speed, target.device, config.expected_images) == "compile"
        blocks, rest = slot_bytes(checked["transformer"].network.module, config.lora_slots, config.lora_rank,
                                  target.dtype.itemsize, widened=compiled)
        sizes = with_extra_transformer_bytes(sizes, blocks, rest)
    return sizes


def transform_weights(networks: Networks, target: Target, plan, config: EngineConfig, loras) -> list[str]:
    """Weight transforms, in order, where the networks were loaded (before placement, fusion and compilation):
    merged LoRAs, fp8 quantisation, runtime LoRA slots. Returns their names, for the log."""
    import torch

    done = []
    if config.loras:
        loras.set_merged(config.loras)  # in the compute dtype, before fp8 rounds the sums
        done.append(f"LoRA merged ({len(config.loras)})")
    if plan.weight_dtype == "fp8":  # the user's lossy choice; quantised where it was loaded
        from zimage.speed.fp8 import fp8_matmul_supported, quantize_transformer

        matmul = target.dtype == torch.bfloat16 and fp8_matmul_supported(target.device)
        quantize_transformer(networks.transformer, matmul=matmul)
        done.append("fp8" + (" matmul" if matmul else " storage"))
    if config.lora_slots:
        loras.install_runtime(config.lora_slots, config.lora_rank)
        done.append(f"runtime LoRA ({config.lora_slots} slots of rank {config.lora_rank})")
    return done


def choose_recipe(config: EngineConfig, model_id: str, scheduler):
    """(Recipe, why): the one the config names, else the model's (zimage.recipe.detect_recipe)."""
    from zimage.recipe import detect_recipe, recipe_named

    named = recipe_named(config.recipe)
    if named is not None:
        return named, f"--recipe {named.name}"
    return detect_recipe(model_id, scheduler.shift)


def recipe_of(config: EngineConfig):
    """(Recipe, why) the engine for `config` will use, found without loading it (the folder located, its scheduler
    config read): entrypoints fill in their requests' defaults before any long work (the CLI's warnings, names)."""
    from zimage.engine.sampling import FlowMatchConfig
    from zimage.weights.locate import locate_model

    location = locate_model(config.model)
    scheduler = FlowMatchConfig.from_file(location.path / "scheduler" / "scheduler_config.json")
    return choose_recipe(config, location.model_id, scheduler)


def build_engine(config: EngineConfig):
    """The whole pipeline: a placed, sped-up Engine for `config`."""
    t0 = time.perf_counter()
    import torch

    log.debug("torch %s imported (%.2fs)", torch.__version__, time.perf_counter() - t0)
    from zimage.engine.device import dtype_name
    from zimage.engine.engine import Engine
    from zimage.weights.check import check_model_folder
    from zimage.weights.load import prepare_reads
    from zimage.weights.locate import locate_model

    target = resolve_target(config)
    prepare_reads(target.device)
    log.debug("device %s, dtype %s", target.device, dtype_name(target.dtype))
    location = locate_model(config.model)
    checked = check_model_folder(location.path)  # every part present and well-formed, before reading data
    log.debug("%s checked at %s", location.model_id, location.path)
    loras = lora_state(config, target, checked)
    sizes = plan_sizes(config, target, checked)
    plan = plan_memory(config, target, sizes)
    log.debug("memory plan: %s", plan.describe())
    networks = read(config, target, location, checked, plan)
    transforms = transform_weights(networks, target, plan, config, loras)
    engine = Engine(config, location, target, networks, sizes, checked, loras)
    engine.recipe, why = choose_recipe(config, location.model_id, networks.scheduler)
    log.debug("recipe %s (%s): %d steps, guidance %g", engine.recipe.name, why, engine.recipe.steps,
              engine.recipe.guidance)
    engine.place(plan)
    engine.load_seconds = time.perf_counter() - t0
    log.info("loaded %s from %s in %.1fs (%s, %s, plan %s, speed %s%s)", location.model_id, location.path,
             engine.load_seconds, target.device, target.dtype, plan.describe(), engine.speed,
             "".join(f", {t}" for t in transforms))
    return engine


def _plan_warm_start(config: EngineConfig, target: Target, plan, checked, tokenizer, vae):
    """The first image's start-up work (zimage.engine.warm_start) for this load, or None."""
    from zimage.engine.warm_start import WarmStart, stand_in_for
    from zimage.speed.modes import resolve_speed

    device = target.device
    eager = resolve_speed(config.speed, device, config.expected_images) == "eager"
    stand_in = None
    if eager and device.type == "cuda":
        stand_in = stand_in_for(plan, checked["transformer"].network.config, target.dtype, tokenizer,
                                config.warm_prompts, config.max_text_tokens)
    return WarmStart.plan(device, config.warm_prompts, vae if eager else None, config.warm_size, stand_in)
