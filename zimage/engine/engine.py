"""The engine: `Engine.load(config)` once, `engine.generate(request)` many times.

    generate = encode (text encoder) -> denoise (transformer, N Euler steps) -> decode (VAE)

The memory policy is entered before each phase; progress and cancellation hook in at step boundaries; no host-device
synchronisation happens inside the step loop (timings synchronise only at phase boundaries).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from zimage.engine.config import EngineConfig
from zimage.engine.result import GeneratedImage, GenerateResult, Progress
from zimage.errors import GenerationCancelled, NonFiniteOutputError
from zimage.io.metadata import ImageMetadata
from zimage.request import GenerateRequest

log = logging.getLogger("zimage")


@dataclass
class Conditioning:
    """Output of the encode phase: one caption embedding per image (and per negative, with CFG)."""

    positive: list  # B tensors (L_i, D)
    negative: list  # B tensors with CFG, else []


class Engine:
    def __init__(self, config, location, device, dtype, prompts, scheduler, transformer, text_encoder, vae, policy):
        from zimage.speed.fast_transformer import FastTransformer

        self.config = config
        self.location = location  # zimage.weights.locate.ModelLocation
        self.device = device
        self.dtype = dtype
        self.scheduler = scheduler
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.vae = vae
        self.policy = policy
        self.prompts = prompts  # zimage.engine.text.PromptEncoder (tokenizer + text encoder + embedding cache)
        self.fast = FastTransformer(transformer)  # the step function; attention backend set by apply_speed
        self.speed = "eager"  # set by zimage.speed.apply_speed
        self.load_seconds = 0.0

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, config: EngineConfig | None = None, **overrides) -> "Engine":
        """Find, check and load the model; choose device, dtype, memory plan and speed mode."""
        t0 = time.perf_counter()
        import torch

        log.debug("torch %s imported (%.2fs)", torch.__version__, time.perf_counter() - t0)

        from concurrent.futures import Future, ThreadPoolExecutor

        from zimage.engine.device import dtype_name, resolve_device, resolve_dtype
        from zimage.engine.fp16_guard import install_fp16_guard
        from zimage.engine.text import PromptEncoder
        from zimage.engine.sampling import FlowMatchConfig
        from zimage.memory.policy import Parts
        from zimage.memory.select import select_policy
        from zimage.models.tokenizer import PromptTokenizer
        from zimage.speed.apply import apply_speed
        from zimage.weights.check import check_model_folder
        from zimage.weights.load import load_network, prepare_reads
        from zimage.weights.locate import locate_model

        config = config or EngineConfig()
        if overrides:
            from dataclasses import replace

            config = replace(config, **overrides)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        prepare_reads(device)
        log.debug("device %s, dtype %s", device, dtype_name(dtype))
        location = locate_model(config.model)
        checked = check_model_folder(location.path)  # every part present and well-formed, before reading data
        log.debug("%s checked at %s", location.model_id, location.path)

        tokenizer = PromptTokenizer.from_folder(location.path / "tokenizer")
        scheduler = FlowMatchConfig.from_file(location.path / "scheduler" / "scheduler_config.json")
        log.debug("tokenizer and scheduler read")
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # the VAE overflows in fp16
        total = sum(c.nbytes for c in checked.values())
        bar = _progress_bar(config.show_progress, total, f"loading {location.model_id}")
        policy = select_policy(config, device, dtype, checked)
        log.debug("memory plan: %s", policy.describe())
        try:
            step = bar.update if bar else None
            conv = config.converted_cache
            # Each network is loaded straight to where the plan keeps it (device, or host memory to stream from).
            # The VAE first; then a loader thread reads the text encoder and the transformer while this thread,
            # the one that will generate, does the first image's start-up work (zimage.engine.warm_start).
            vae = load_network(checked["vae"], policy.home("vae", device), vae_dtype, step)
            text_ready: Future = Future()

            def read_the_rest():
                try:
                    text_ready.set_result(load_network(checked["text_encoder"], policy.home("text_encoder", device),
                                                       dtype, step, conv))
                except BaseException as e:
                    text_ready.set_exception(e)
                    raise
                return load_network(checked["transformer"], policy.home("transformer", device), dtype, step, conv)

            with ThreadPoolExecutor(1, thread_name_prefix="zimage-loader") as loader:
                transformer_ready = loader.submit(read_the_rest)
                warm = _plan_warm_start(config, device, dtype, policy, checked, tokenizer, vae)
                if warm is not None:
                    warm.before_text_encoder()
                text_encoder = text_ready.result()
                prompts = PromptEncoder(tokenizer, text_encoder, device, config.max_text_tokens,
                                        config.prompt_cache_size)
                if warm is not None:
                    warm.with_text_encoder(prompts)
                transformer = transformer_ready.result()
            if policy.plan.weight_dtype == "fp8":  # the user's lossy choice; quantised where it was loaded
                from zimage.speed.fp8 import fp8_matmul_supported, quantize_transformer

                quantize_transformer(transformer, matmul=dtype == torch.bfloat16 and fp8_matmul_supported(device))
        finally:
            if bar:
                bar.close()
        engine = cls(config, location, device, dtype, prompts, scheduler, transformer, text_encoder, vae, policy)
        policy.place(Parts(transformer, text_encoder, vae, device))
        engine.speed = apply_speed(engine, config.speed, config.expected_images)
        if dtype == torch.float16:  # after apply_speed, which may replace the feed-forward modules it hooks
            install_fp16_guard(transformer)
        engine.load_seconds = time.perf_counter() - t0
        log.info("loaded %s from %s in %.1fs (%s, %s, plan %s, speed %s)", location.model_id, location.path,
                 engine.load_seconds, device, dtype, policy.describe(), engine.speed)
        return engine

    # ---------------------------------------------------------------- phases
    def encode(self, requests: list[GenerateRequest]) -> tuple[Conditioning, list[str]]:
        """Caption embeddings for every image of the requests (in order), plus prompt-truncation warnings."""
        self.policy.enter("encode")
        texts = [p for r in requests for p in r.prompts] + [r.negative_prompt for r in requests if r.cfg]
        unique = list(dict.fromkeys(texts))
        warnings = self.prompts.truncation_warnings(unique)
        embedded = dict(zip(unique, self.prompts.encode(unique)))
        positive = [embedded[p] for r in requests for p in r.image_prompts()]
        negative = [embedded[r.negative_prompt] for r in requests for _ in range(r.num_images) if r.cfg]
        if self.dtype.itemsize == 2 and not all(_finite(e) for e in embedded.values()):
            raise NonFiniteOutputError(f"the text encoder overflowed in {self.dtype}; run with --dtype fp32 or bf16")
        return Conditioning(positive, negative), warnings

    def denoise(self, cond: Conditioning, seeds: list[int], shape: GenerateRequest, on_progress=None, alive=None):
        """N Euler steps from seeded noise; returns float32 latents (B, 16, H/8, W/8).

        `shape` gives width, height, steps and guidance (shared by the batch). `alive()`, if given, is called at
        each step boundary and returns a bool per image still wanted: dropped images leave the batch there (their
        rows are cut from the latents and captions), so a cancelled request stops costing compute at once.
        Returns (latents of the images still alive, their indices).
        """
        import torch

        from zimage.engine.sampling import cfg_combine, euler_step, initial_noise, make_schedule

        self.policy.enter("denoise")
        schedule = make_schedule(self.scheduler, shape.steps, self.device)
        latents = initial_noise(seeds, self.transformer.in_channels, shape.height, shape.width, self.device)
        index = list(range(len(seeds)))  # original position of each row still in the batch
        positive, negative = list(cond.positive), list(cond.negative)
        bar = _progress_bar(self.config.show_progress and shape.steps > 1, shape.steps, "denoising", unit="step")
        with torch.inference_mode():
            ctx = self.fast.prepare(positive + negative, latents.shape[2], latents.shape[3])
            for i in range(schedule.steps):
                if alive is not None:
                    keep = [k for k, ok in enumerate(alive()) if ok and k in index]
                    if len(keep) < len(index):
                        rows = [index.index(k) for k in keep]
                        latents = latents[rows]
                        positive = [positive[r] for r in rows]
                        negative = [negative[r] for r in rows] if negative else []
                        index = keep
                        if index:
                            ctx = self.fast.prepare(positive + negative, latents.shape[2], latents.shape[3])
                    if not index:
                        break
                batch = latents.shape[0]
                x = latents.to(self.dtype)
                if shape.cfg:
                    x = torch.cat([x, x])
                t = schedule.timesteps[i].expand(x.shape[0])  # (B',)
                velocity = self.fast.forward(x, t, ctx).float()  # (B', C, h, w)
                if shape.cfg:
                    velocity = cfg_combine(velocity[:batch], velocity[batch:], shape.guidance)
                latents = euler_step(latents, velocity, schedule.sigmas[i], schedule.sigmas[i + 1])
                if bar:
                    bar.update()
                if on_progress is not None:
                    on_progress(Progress("denoise", i + 1, schedule.steps, latents))
        if bar:
            bar.close()
        if index and not _finite(latents):
            raise NonFiniteOutputError(
                f"the transformer produced NaN/inf in {self.dtype} (fp16 overflow?); no image was written. "
                "Use --dtype bf16 (GPUs from Ampere on) or fp32."
            )
        return latents, index

    def decode(self, latents):
        """(B, 16, h, w) -> (B, 3, H, W) float pixels in [0, 1]."""
        from zimage.engine.decode import decode_latents

        self.policy.enter("decode")
        return decode_latents(self.vae, latents, tile=getattr(self.policy, "tiled_decode", False))

    # ---------------------------------------------------------------- all three
    def generate(self, request: GenerateRequest, on_progress=None, cancel=None) -> GenerateResult:
        """Make every image of `request`. `on_progress(Progress)` is called at step boundaries; `cancel.is_set()`
        (e.g. a threading.Event) is checked there too and raises GenerationCancelled."""
        result = self.generate_many([request], on_progress, [cancel] if cancel is not None else None)[0]
        if result is None:
            raise GenerationCancelled("the generation was cancelled")
        return result

    def generate_many(self, requests: list[GenerateRequest], on_progress=None, cancels=None) -> list:
        """Run several requests as one batch (same width, height, steps and guidance). Each image is what it would
        be alone: its own seed and caption. `cancels[j].is_set()` drops request j at the next step; its result is
        None. Returns one GenerateResult (or None) per request. A GPU out-of-memory switches to a leaner memory plan
        and retries once (zimage.memory.oom), with a note in each result's warnings."""
        from zimage.memory.oom import run_with_recovery

        return run_with_recovery(self, requests, lambda: self._generate_many(requests, on_progress, cancels))

    def _generate_many(self, requests: list[GenerateRequest], on_progress=None, cancels=None) -> list:
        from zimage.engine.decode import to_pil
        from zimage.errors import UsageError

        first = requests[0]
        for r in requests[1:]:
            if (r.width, r.height, r.steps, r.guidance) != (first.width, first.height, first.steps, first.guidance):
                raise UsageError("requests batched together must share width, height, steps and guidance")
        owner = [j for j, r in enumerate(requests) for _ in range(r.num_images)]  # request of each image
        seeds = [s for r in requests for s in r.image_seeds()]
        alive = None
        if cancels is not None:
            alive = lambda: [not (cancels[j] is not None and cancels[j].is_set()) for j in owner]  # noqa: E731

        timings = {}
        t0 = time.perf_counter()
        cond, warnings = self.encode(requests)
        for w in warnings:
            log.warning(w)
        timings["encode"] = self._lap(t0)
        if on_progress:
            on_progress(Progress("encode", 1, 1))
        latents, index = self.denoise(cond, seeds, first, on_progress, alive)
        timings["denoise"] = self._lap(t0) - timings["encode"]
        images = to_pil(self.decode(latents)) if index else []
        timings["decode"] = self._lap(t0) - timings["encode"] - timings["denoise"]
        timings["total"] = time.perf_counter() - t0
        if on_progress:
            on_progress(Progress("decode", 1, 1))

        by_image = dict(zip(index, images))
        results, start = [], 0
        for j, r in enumerate(requests):
            rows = range(start, start + r.num_images)
            start += r.num_images
            if any(k not in by_image for k in rows):
                results.append(None)
                continue
            mine = [GeneratedImage(by_image[k], self.metadata(r, k - rows.start), k - rows.start) for k in rows]
            results.append(GenerateResult(r, mine, dict(timings), warnings))
        return results

    def _weights_dtype(self) -> str:
        """The compute dtype, with '+fp8' when the transformer's matrices are stored in fp8 (lossy: recorded)."""
        from zimage.engine.device import dtype_name

        fp8 = getattr(getattr(self.policy, "plan", None), "weight_dtype", None) == "fp8"
        return dtype_name(self.dtype) + ("+fp8" if fp8 else "")

    def metadata(self, request: GenerateRequest, index: int) -> ImageMetadata:
        return ImageMetadata(
            prompt=request.image_prompts()[index], negative_prompt=request.negative_prompt if request.cfg else "",
            seed=request.image_seeds()[index], steps=request.steps, guidance=request.guidance,
            width=request.width, height=request.height, model=self.location.model_id,
            model_revision=self.location.revision, dtype=self._weights_dtype(),
        )

    def describe(self) -> dict:
        return {
            "model": self.location.model_id, "path": str(self.location.path), "source": self.location.source,
            "revision": self.location.revision, "device": str(self.device), "dtype": self._weights_dtype(),
            "memory_plan": self.policy.describe(), "speed": self.speed, "load_seconds": round(self.load_seconds, 3),
        }

    def _lap(self, t0: float) -> float:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def _plan_warm_start(config, device, dtype, policy, checked, tokenizer, vae):
    """The first image's start-up work (zimage.engine.warm_start) for this load, or None."""
    from zimage.engine.warm_start import WarmStart, stand_in_for
    from zimage.speed.apply import resolve_speed

    eager = resolve_speed(config.speed, device, config.expected_images) == "eager"
    stand_in = None
    if eager and device.type == "cuda":
        stand_in = stand_in_for(policy, checked["transformer"].network.config, dtype, tokenizer, config.warm_prompts,
                                config.max_text_tokens)
    return WarmStart.plan(device, config.warm_prompts, vae if eager else None, config.warm_size, stand_in)


def _finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def _progress_bar(enabled: bool, total: int, desc: str, unit: str = "B"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=False)
