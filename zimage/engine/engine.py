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
from zimage.engine.progress import progress_bar
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
    """A loaded model: `Engine.load(config)` builds one (zimage.engine.build), `generate` runs it."""

    def __init__(self, config: EngineConfig, location, target, networks, sizes, checked: dict, loras):
        self.config = config
        self.location = location  # zimage.weights.locate.ModelLocation
        self.target = target  # zimage.engine.build.Target: device, dtype, the VAE's dtype
        self.device = target.device
        self.dtype = target.dtype
        self.checked = checked  # {network: zimage.weights.check.CheckedNetwork}: where each tensor is stored
        self.loras = loras  # zimage.engine.loras.EngineLoras: the merged set, runtime slots
        self.transformer = networks.transformer  # zimage.models.z_image.ZImageTransformer
        self.text_encoder = networks.text_encoder  # the plain module the memory policy places
        self.vae = networks.vae
        self.vae_encoder = None  # loaded by image_encoder() on the first image input
        self.prompts = networks.prompts  # zimage.engine.text.PromptEncoder (tokenizer + text encoder + cache)
        self.scheduler = networks.scheduler
        self.sizes = sizes  # zimage.memory.sizes.ModelSizes: what plans are made from (also when re-planning)
        self.recipe = None  # zimage.recipe.Recipe: the defaults of steps and guidance (set by the build)
        self.policy = None  # zimage.memory.planned.PlannedPolicy, set by place()
        self.speed_setup = None  # zimage.speed.apply.SpeedSetup, set by place()
        self.load_seconds = 0.0

    @classmethod
    def load(cls, config: EngineConfig | None = None, **overrides) -> "Engine":
        """Find, check and load the model; choose device, dtype, memory plan and speed mode."""
        from zimage.engine.build import build_engine

        config = config or EngineConfig()
        if overrides:
            from dataclasses import replace

            config = replace(config, **overrides)
        return build_engine(config)

    @property
    def speed(self) -> str:
        """The speed mode that runs: 'eager' or 'compile' (zimage.speed.apply)."""
        return self.speed_setup.mode

    @property
    def parts(self):
        from zimage.memory.policy import Parts

        return Parts(self.transformer, self.text_encoder, self.vae, self.device, self.vae_encoder)

    def replan(self):
        """The plan for the networks as they are now (an encoder loaded, say), within the budget the engine was
        planned for (not what is free now: the engine's own weights take that), at the default image size."""
        from zimage.engine.build import PLAN_BATCH, PLAN_HEIGHT, PLAN_WIDTH
        from zimage.memory.select import plan_for

        budget = self.policy.plan.budget_bytes if self.device.type == "cuda" else None
        return plan_for(self.sizes, budget, PLAN_WIDTH, PLAN_HEIGHT, PLAN_BATCH, self.config.fp8)

    def batch_limit(self, width: int, height: int, cfg: bool = False, limit: int = 64) -> int:
        """The most images per engine call (up to `limit`) that the current placement fits within its budget at
        width x height: a server batches up to this, so its first full batch does not run out of memory into a
        leaner plan (images x 2 rows with CFG; at least 1)."""
        from zimage.memory.planner import largest_batch

        rows = largest_batch(self.policy.plan, self.sizes, width, height, limit * (2 if cfg else 1))
        return max(1, rows // 2) if cfg else rows

    def set_loras(self, loras) -> bool:
        """Replace the merged LoRA set (LoraSpecs or 'FILE[:STRENGTH]'), exactly (zimage.engine.loras); prompt
        embeddings made with the old text encoder are forgotten. True if the weights changed."""
        changed = self.loras.set_merged(loras)
        if changed:
            self.prompts.clear_cache()
        return changed

    def image_encoder(self):
        """The VAE encoder, loaded at the first image input (text-to-image never reads it): checked, read, then the
        engine is re-planned with it counted and re-placed (Engine.place)."""
        if self.vae_encoder is None:
            from zimage.memory.sizes import with_vae_encoder
            from zimage.weights.check import check_network
            from zimage.weights.load import load_network

            checked = check_network(self.location.path, "vae_encoder")
            self.vae_encoder = load_network(checked, self.device, self.target.vae_dtype)
            self.checked["vae_encoder"] = checked
            self.sizes = with_vae_encoder(self.sizes, checked)
            self.place(self.replan())
            log.info("VAE encoder loaded (%.0f MB); memory plan now %s", checked.nbytes / 1e6, self.policy.describe())
        return self.vae_encoder

    # ---------------------------------------------------------------- placement
    def place(self, plan) -> None:
        """Put the networks where `plan` (zimage.memory.plan.MemoryPlan) says, then apply speed for that placement
        and the fp16 guard. The only way an engine's placement changes: the first placement, an out-of-memory
        fallback (zimage.memory.oom) and a weight change all come through here, so speed always matches the plan
        (a plan that streams blocks runs them eager, even if they were compiled under the previous one)."""
        import torch

        from zimage.memory.oom import free_memory
        from zimage.memory.planned import PlannedPolicy
        from zimage.speed.apply import apply_speed

        if self.policy is not None:
            # Compile mode's text-encoder CUDA graphs replay the old placement's weight addresses: drop them (their
            # pool is freed below) before moving anything.
            self.prompts.text_encoder = self.text_encoder
            self.speed_setup = None
            self.policy.remove()
        policy = PlannedPolicy(plan)
        policy.place(self.parts)
        self.policy = policy
        self.speed_setup = apply_speed(self.parts, self.config.speed, plan, self.config.expected_images,
                                       self.config.max_text_tokens, self.config.compile_cache)
        self.prompts.text_encoder = self.speed_setup.text_encoder
        if self.dtype == torch.float16:  # after apply_speed, which may replace the feed-forward modules it hooks
            from zimage.engine.fp16_guard import install_fp16_guard

            install_fp16_guard(self.transformer)
        free_memory(self.device)

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

    def noise(self, seeds: list[int], shape: GenerateRequest):
        """(B, 16, H/8, W/8) float32 on the device: image i's noise from its own CPU generator seeded seeds[i]."""
        from zimage.engine.sampling import initial_noise

        return initial_noise(seeds, self.transformer.in_channels, shape.height, shape.width, self.device)

    def denoise(self, cond: Conditioning, latents, shape: GenerateRequest, on_progress=None, alive=None,
                start: int = 0, blend=None, lora_slots: list[int] | None = None):
        """Euler steps `start`..N-1 of the request's schedule from `latents`; returns float32 latents
        (B, 16, H/8, W/8) of the images still alive, and their indices.

        `latents` (B, 16, H/8, W/8) float32 on the device: seeded noise for text-to-image (zimage.engine.sampling.
        initial_noise), or an image's latents noised to sigma[start] (img2img). `shape` gives width, height, steps
        and guidance (shared by the batch). `alive()`, if given, is called at each step boundary and returns a bool
        per image still wanted: dropped images leave the batch there (their rows are cut from the latents and
        captions), so a cancelled request stops costing compute at once. `blend(latents, sigma_next)`, if given,
        runs after each Euler step (inpainting: zimage.engine.start.Inpaint) and has a `rows(kept)`.
        `lora_slots` gives each row's runtime LoRA slot (zimage.engine.loras; -1 or None: no per-request LoRA).
        """
        import torch

        from zimage.engine.sampling import cfg_combine, euler_step, make_schedule

        self.policy.enter("denoise")
        schedule = make_schedule(self.scheduler, shape.steps, self.device)
        if not 0 <= start < schedule.steps:
            raise ValueError(f"start step {start} outside 0..{schedule.steps - 1}")
        index = list(range(latents.shape[0]))  # original position of each row still in the batch
        positive, negative = list(cond.positive), list(cond.negative)
        steps = schedule.steps - start
        bar = progress_bar(self.config.show_progress and steps > 1, steps, "denoising", unit="step")
        lora_rows = self.loras.runtime.rows if self.loras.runtime is not None else None

        def set_lora_rows():
            if lora_rows is not None:  # positive rows, then the same slots for the negative (CFG) rows
                slots = [lora_slots[k] if lora_slots else -1 for k in index]
                lora_rows.set(slots * (2 if shape.cfg else 1), self.device, self.dtype)

        set_lora_rows()
        with torch.inference_mode():
            ctx = self.transformer.prepare(positive + negative, latents.shape[2], latents.shape[3])
            for i in range(start, schedule.steps):
                if alive is not None:
                    keep = [k for k, ok in enumerate(alive()) if ok and k in index]
                    if len(keep) < len(index):
                        rows = [index.index(k) for k in keep]
                        latents = latents[rows]
                        blend = blend.rows(rows) if blend is not None else None
                        positive = [positive[r] for r in rows]
                        negative = [negative[r] for r in rows] if negative else []
                        index = keep
                        if index:
                            set_lora_rows()
                            ctx = self.transformer.prepare(positive + negative, latents.shape[2], latents.shape[3])
                    if not index:
                        break
                batch = latents.shape[0]
                x = latents.to(self.dtype)
                if shape.cfg:
                    x = torch.cat([x, x])
                t = schedule.timesteps[i].expand(x.shape[0])  # (B',)
                velocity = self.transformer(x, t, ctx).float()  # (B', C, h, w)
                if shape.cfg:
                    velocity = cfg_combine(velocity[:batch], velocity[batch:], shape.guidance)
                latents = euler_step(latents, velocity, schedule.sigmas[i], schedule.sigmas[i + 1])
                if blend is not None:
                    latents = blend(latents, schedule.sigmas[i + 1])
                if bar:
                    bar.update()
                if on_progress is not None:
                    on_progress(Progress("denoise", i + 1 - start, steps, latents))
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
        return decode_latents(self.vae, latents, tile=self.policy.plan.tiled_decode)

    # ---------------------------------------------------------------- all three
    def warm_up(self, width: int, height: int, steps: int, max_batch: int = 1) -> None:
        """Compile, before a service takes requests, the graphs its first batches would otherwise stall on (a few
        seconds each on an H200, minutes of queue under load): one image; under compile with batches of 2 or more,
        a batch of 2 (graphs specialise on batch size 1 first; the batch-dynamic graph then serves every later
        size); and with runtime LoRA slots, that batch once more through the mixed-slot path (zimage.models.lora:
        a batch whose rows use different sets has its own graph). Eager mode makes one image (its caches)."""
        one = dict(prompts=("warm-up",), width=width, height=height, steps=steps, seed=0)
        self.generate(GenerateRequest(**one))
        if self.speed != "compile" or max_batch < 2:
            return
        two = GenerateRequest(**one, n=2)
        self.generate(two)
        runtime = self.loras.runtime
        if runtime is not None and self.config.lora_slots >= 2:
            with runtime.forcing_mixed():
                self.generate(two)

    def generate(self, request: GenerateRequest, on_progress=None, cancel=None) -> GenerateResult:
        """Make every image of `request`. `on_progress(Progress)` is called at step boundaries; `cancel.is_set()`
        (e.g. a threading.Event) is checked there too and raises GenerationCancelled."""
        result = self.generate_many([request], on_progress, [cancel] if cancel is not None else None)[0]
        if result is None:
            raise GenerationCancelled("the generation was cancelled")
        return result

    def generate_many(self, requests: list[GenerateRequest], on_progress=None, cancels=None) -> list:
        """Run several requests as one batch (equal `batch_key()`: size, steps, guidance, image-input kind). Each
        image is what it would be alone: its own seed, caption, LoRA set and picture. `cancels[j].is_set()` drops request j at the next step; its result is
        None. Returns one GenerateResult (or None) per request. A GPU out-of-memory switches to a leaner memory plan
        and retries once (zimage.memory.oom), with a note in each result's warnings."""
        from zimage.memory.oom import run_with_recovery

        requests = [r.with_recipe(self.recipe) for r in requests]  # steps and guidance left unset: the model's
        if any(r.image is not None for r in requests):
            self.image_encoder()  # loaded and re-planned at the first image input, before the plan is relied on

        def run():
            setup = self.speed_setup
            with setup.scoped():  # compiled: the portable compile artifacts are loaded before the first run
                results = self._generate_many(requests, on_progress, cancels)
            setup.save_compiled()  # and saved after a run that compiled graphs they lack (the first, a new size)
            return results

        return run_with_recovery(run, self.policy.plan, self.sizes, requests, self.device, self.place)

    def _generate_many(self, requests: list[GenerateRequest], on_progress=None, cancels=None) -> list:
        from zimage.engine.decode import to_pil
        from zimage.errors import UsageError

        first = requests[0]
        for r in requests[1:]:
            if r.batch_key() != first.batch_key():
                raise UsageError("requests batched together must share width, height, steps, guidance and, with an "
                                 "input image, strength and whether a mask is given")
        owner = [j for j, r in enumerate(requests) for _ in range(r.num_images)]  # request of each image
        seeds = [s for r in requests for s in r.image_seeds()]
        alive = None
        if cancels is not None:
            alive = lambda: [not (cancels[j] is not None and cancels[j].is_set()) for j in owner]  # noqa: E731

        lora_slots = self.loras.row_slots(requests, self.config.lora_names_only)  # bad LoRAs fail before any work
        timings = {}
        t0 = time.perf_counter()
        cond, warnings = self.encode(requests)
        for w in warnings:
            log.warning(w)
        timings["encode"] = self._lap(t0)
        if on_progress:
            on_progress(Progress("encode", 1, 1))
        if first.image is not None:
            from zimage.engine.start import image_start

            self.policy.enter("encode_image")
            start = image_start(self.image_encoder(), requests, self.scheduler, self.device, self.policy.plan.tiled_decode)
            timings["encode_image"] = self._lap(t0) - timings["encode"]
        else:
            from zimage.engine.start import Start

            start = Start(self.noise(seeds, first), 0)
        latents, index = self.denoise(cond, start.latents, first, on_progress, alive, start.step, start.blend,
                                      lora_slots)
        timings["denoise"] = self._lap(t0) - timings["encode"] - timings.get("encode_image", 0.0)
        images = to_pil(self.decode(latents)) if index else []
        timings["decode"] = self._lap(t0) - sum(timings.values())
        timings["total"] = time.perf_counter() - t0
        if on_progress:
            on_progress(Progress("decode", 1, 1))

        by_image = dict(zip(index, images))
        results, offset = [], 0
        for r in requests:
            rows = range(offset, offset + r.num_images)
            offset += r.num_images
            if any(k not in by_image for k in rows):
                results.append(None)
                continue
            mine = [GeneratedImage(by_image[k], self.metadata(r, k - rows.start), k - rows.start) for k in rows]
            results.append(GenerateResult(r, mine, dict(timings), warnings))
        return results

    def _weights_dtype(self) -> str:
        """The compute dtype, with '+fp8' when the transformer's matrices are stored in fp8 (lossy: recorded)."""
        from zimage.engine.device import dtype_name

        fp8 = self.policy.plan.weight_dtype == "fp8"
        return dtype_name(self.dtype) + ("+fp8" if fp8 else "")

    def metadata(self, request: GenerateRequest, index: int) -> ImageMetadata:
        image = mask = None
        if request.image is not None:
            pic = request.image
            image = {"sha256": pic.sha256, "width": pic.width, "height": pic.height,
                     "source_width": pic.source_size[0], "source_height": pic.source_size[1]}
            if request.mask is not None:
                mask = {"sha256": request.mask.sha256, "blur": request.mask_blur}
        return ImageMetadata(
            prompt=request.image_prompts()[index], negative_prompt=request.negative_prompt if request.cfg else "",
            seed=request.image_seeds()[index], steps=request.steps, guidance=request.guidance,
            width=request.width, height=request.height, model=self.location.model_id,
            model_revision=self.location.revision, dtype=self._weights_dtype(),
            loras=self.lora_record(request), image=image, mask=mask, strength=request.strength,
            resize=request.resize, recipe=self.recipe.name,
        )

    def lora_record(self, request: GenerateRequest) -> tuple:
        """The LoRAs an image of `request` was made with (the merged set, then the request's own), for its PNG."""
        files = list(self.loras.merged) + list(self.loras.resolve(request.loras, self.config.lora_names_only))
        specs = list(self.loras.merged_specs) + list(request.loras)
        return tuple({"name": lora.name, "file": spec.name, "scale": scale, "sha256": lora.sha256,
                      "short_hash": lora.short_hash} for (lora, scale), spec in zip(files, specs))

    def describe(self) -> dict:
        return {
            "model": self.location.model_id, "path": str(self.location.path), "source": self.location.source,
            "revision": self.location.revision, "device": str(self.device), "dtype": self._weights_dtype(),
            "memory_plan": self.policy.describe(), "speed": self.speed, "load_seconds": round(self.load_seconds, 3),
            "recipe": {"name": self.recipe.name, "steps": self.recipe.steps, "guidance": self.recipe.guidance},
        }

    def _lap(self, t0: float) -> float:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0


def _finite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())
