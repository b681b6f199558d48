"""Work for the first image done while the model is still being read (cold start).

Reading the text encoder and the 6B transformer takes the longest part of loading, and the GPU computes nothing
meanwhile: the reads use the copy engines. So once the VAE (the first, smallest network) is on the device, a loader
thread reads the other two (zimage.engine.engine.Engine.load) and the calling thread, the one that will generate,
- decodes a zero latent at the first image's size (eager speed only: compile mode replaces the decoder), which
  pays cuDNN's start-up and loads the convolution kernels the first decode uses;
- runs one denoising step of a stand-in transformer (eager speed, all-resident plan, when it fits): the same
  config cut to one block of each kind, zero weights, zero captions of the first prompt's token count, the first
  image's size. Every kernel the real forward launches (GEMM shapes, attention, norms, RoPE) is then loaded and
  chosen, and the caching allocator holds blocks of the forward's activation sizes;
- once the text encoder is in, encodes the prompts the caller already knows (the CLI passes its first ones) into
  the prompt cache, so the first generate skips the text encoder.
It is the generating thread because part of that start-up is per thread (cuBLAS and cuDNN handles and workspaces):
done in a side thread, the first image's first step still took 180 ms against 104 ms for the later ones (H200,
1024x1024; 205 ms with no stand-in step at all). A stand-in step on a side thread beside the decoder start-up (the
per-thread part then comes from the decoder and the prompt encoding) gained nothing either: with the 16 reading
threads, each piece took twice as long (stand-in 0.98 s, encoding 0.54 s), and the CLI's time to PNG past the
import was 3.46 s against 3.35 s (benchmarks/experiments/warm_start_ab.py, 5 interleaved runs each).
Alone (nothing being read), the decoder start-up takes 0.54 s and the stand-in step 0.37 s; without any of this the
first image pays ~0.8 s more: first step 0.45 s against 0.11 s, encoding 0.47 s against 0.23 s, decoding 0.33 s
against 0.09 s (benchmarks/experiments/warm_start_parts.py).
Results are exactly those of doing the same work later (same modules, same inputs; the stand-in touches no real
weight). Only for networks wholly on the device: under an offloading plan the memory policy moves weights per phase.
A failure here (an out-of-memory, say) is logged and dropped: the first generate does the work again and handles it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("zimage")


@dataclass(frozen=True)
class StandIn:
    """What the stand-in step needs: the transformer's config, the compute dtype, the first caption's length."""

    config: dict  # the transformer's config.json
    dtype: object  # torch dtype of the real forward
    caption_tokens: int  # tokens of the first prompt with the chat template (at most max_text_tokens)


class WarmStart:
    def __init__(self, device, prompt_texts: tuple[str, ...] = (), vae=None, size: tuple[int, int] | None = None,
                 stand_in: StandIn | None = None):
        self.device = device
        self.texts = list(dict.fromkeys(prompt_texts))
        self.vae = vae  # the loaded VAE decoder, or None for no decoder warm-up
        self.size = size  # (width, height) pixels of the first image
        self.stand_in = stand_in

    @classmethod
    def plan(cls, device, prompt_texts=(), vae=None, size=None, stand_in=None) -> "WarmStart | None":
        """The work worth doing on `device`, or None. `vae` and `size` ask for the decoder warm-up, `stand_in` (with
        `size`) for the stand-in step, `prompt_texts` for encoding once the text encoder is loaded."""
        if not worth_it(device, prompt_texts, vae, size, stand_in):
            return None
        return cls(device, tuple(prompt_texts), vae, size, stand_in)

    def before_text_encoder(self) -> None:
        """The decoder warm-up and the stand-in step (they need no text encoder)."""
        if self.vae is not None and self.size is not None:
            self._attempt(f"decoder started at {self.size[0]}x{self.size[1]}", self._decoder)
        if self.stand_in is not None and self.size is not None:
            self._attempt("stand-in step", self._stand_in_step)

    def with_text_encoder(self, prompts) -> None:
        """Encode the known prompts with `prompts` (zimage.engine.text.PromptEncoder) into its cache."""
        from zimage.memory.policy import on_device

        if self.texts and on_device(prompts.text_encoder, self.device):
            self._attempt(f"{len(self.texts)} prompt(s) encoded", lambda: prompts.encode(self.texts))

    def _attempt(self, what: str, work) -> None:
        import torch

        t = time.perf_counter()
        try:
            work()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - the first generate redoes this work and reports its own errors
            log.warning("warm start: %s skipped (%s: %s); the first image does this work instead",
                        what, type(e).__name__, e)
            return
        log.debug("warm start: %s (%.2fs)", what, time.perf_counter() - t)

    def _decoder(self) -> None:
        import torch

        from zimage.engine.decode import decode_latents

        w, h = self.size
        channels = self.vae.config.latent_channels
        decode_latents(self.vae, torch.zeros(1, channels, h // 8, w // 8, device=self.device))

    def _stand_in_step(self) -> None:
        """One eager step of `stand_in_transformer` at the first image's size and caption length."""
        import torch

        spec = self.stand_in
        model = stand_in_transformer(spec.config, self.device, spec.dtype)  # native attention, as eager speed uses
        w, h = self.size
        caption = torch.zeros(spec.caption_tokens, model.config["cap_feat_dim"], dtype=spec.dtype, device=self.device)
        with torch.inference_mode():
            ctx = model.prepare([caption], h // 8, w // 8)
            x = torch.zeros(1, model.in_channels, h // 8, w // 8, dtype=spec.dtype, device=self.device)
            model(x, torch.full((1,), 0.5, device=self.device), ctx)


def worth_it(device, prompt_texts, vae, size, stand_in) -> bool:
    """On a GPU (on a CPU the work would only compete for the cores that read the weights), with something to do:
    a VAE wholly on the device to warm up, a stand-in step, or prompts to encode."""
    from zimage.memory.policy import on_device

    if device.type != "cuda":
        return False
    decoder = vae is not None and size is not None and on_device(vae, device)
    return bool(decoder or (stand_in is not None and size is not None) or prompt_texts)


def stand_in_for(plan, config: dict, dtype, tokenizer, prompt_texts, max_tokens: int) -> StandIn | None:
    """The stand-in step's spec, or None where it does not apply: only under the all-resident plan (an fp8 plan runs
    other kernels, a streamed one other code), only where the plan leaves room for its weights above the predicted
    peak, and only with a known first prompt (its token count sets the caption's shape)."""
    if not prompt_texts or plan is None or plan.kind != "resident":
        return None
    if plan.budget_bytes - plan.peak_bytes < stand_in_bytes(config, dtype):
        return None
    tokens = min(tokenizer.count_tokens(tokenizer.template(prompt_texts[0])), max_tokens)
    return StandIn(config, dtype, tokens)


def stand_in_transformer(config: dict, device, dtype):
    """The transformer of `config` cut to one block of each kind (noise refiner, context refiner, joint), with zero
    weights on `device` in `dtype`: the real forward's shapes and kernels, ~1/13 of its weights (1.1 GB)."""
    import torch

    model = _stand_in_on_meta(config)
    zeros = {name: torch.zeros(t.shape, dtype=dtype, device=device) for name, t in model.state_dict().items()}
    model.load_state_dict(zeros, assign=True)
    return model.requires_grad_(False).eval()


def stand_in_bytes(config: dict, dtype) -> int:
    """GPU bytes of `stand_in_transformer(config, ..., dtype)`'s weights."""
    return sum(p.numel() for p in _stand_in_on_meta(config).parameters()) * dtype.itemsize


def _stand_in_on_meta(config: dict):
    import torch

    from zimage.models.z_image import ZImageTransformer

    with torch.device("meta"):
        return ZImageTransformer({**config, "n_layers": 1, "n_refiner_layers": 1})
