"""Precompiled graphs: a later process runs the compiled transformer blocks and VAE decoder without tracing them.

With torch.compile, every new process traces each compiled frame with dynamo again, even when all of inductor's
kernels come from a cache: on an H200 a second process's first 1024x1024 image took 4.7-6.6 s after loading, most
of it dynamo re-tracing the three block graphs and the decoder (BENCHMARKS.md). torch's ahead-of-time compile
(`torch.compile(fn, fullgraph=True).aot_compile(example)`) instead serialises the whole compiled function: dynamo's
output code, inductor's compiled graph and kernels, and the guards. Loaded in a new process it runs at once; its
guards (tensor shapes, dtypes, devices, module structure and attributes) are checked on every call.

The compiled function takes the module as an argument (`_forward(module, *args)`), so its parameters are inputs,
not constants: one function serves every block of a kind at a shape (the 30 joint blocks share one; the 2
noise-refiner blocks, same kind at the image tokens only, another). One function per *family*, a call kind at one
shape:

    block-{mod,plain}-{nomask,mask}.b<B>-l<L>    TransformerBlock.forward(x (B, L, D), mask, freqs, adaln)
    decoder.b<B>-<h>x<w>                         Decoder.forward(z (B, C, h, w))

(the kind, a dot, the shape), e.g. block-mod-nomask.b1-l4160 for the joint blocks at 1024x1024 (4096 image + 64
caption tokens).
`mod` / `plain`: with or without timestep modulation (the caption refiner has none). Shapes are static, as
torch.compile's first graph of a shape is: measured on an H200 (2026-12-03), graphs compiled with dynamic token
counts and latent sizes ran as fast but re-ran Triton's per-size autotuning in every process (1.2 s with inductor's
local caches, 7.2 s without) and compiled the decoder in 47 s against 18 s. A kind keeps at most MAX_SHAPES
functions; further shapes (a server asked for many sizes) run torch.compile's path, which turns dynamic by itself.

Files, next to the portable compile cache (zimage.speed.compile_cache, whose slot and key they share):

    <zimage cache>/compile-artifacts/<slot>/<family>.zaot

in compile_cache's file format (its header holds the whole key plus the family and torch's thread count; one
segment: torch's serialised function). A file whose key differs (another torch, GPU, zimage source, model
structure, thread count) or that cannot be read is not loaded: the family is compiled again and the file overwritten
after the run (`save()`). The engine loads every saved family while it loads (`preload()`).

When a call has no function yet, the first call compiles one ahead of time from that call (in place of the
torch.compile path, not beside it) and runs it; `save()`, called after each compiled generation, writes what was
compiled. A call the function's guards refuse, a module that does not qualify (runtime LoRA slots, fp8 layers, hooks:
`qualifies`), autograd-visible calls (outside inference mode), a kind at MAX_SHAPES or a family that failed to
compile run the regular torch.compile path (zimage.speed.apply.compile_blocks), so no call is ever refused.

Off with ZIMAGE_PRECOMPILED=0 (torch.compile then traces in every process, as before), or with the compile cache
(EngineConfig(compile_cache=False), ZIMAGE_COMPILE_CACHE=0).
"""

from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path

from torch import nn

from zimage.models import vae as vae_models
from zimage.models.z_image import Attention, FeedForward, RMSNorm, TransformerBlock
from zimage.speed import compile_cache
from zimage.speed.fuse import FusedSwiGLU

log = logging.getLogger("zimage")

ENV = "ZIMAGE_PRECOMPILED"
SUFFIX = ".zaot"
# Functions per kind (block-mod-nomask, decoder, ...). An image size takes two of the modulated kind (the noise
# refiner at the image tokens, the joint blocks at image + caption tokens), per batch size: 8 cover a server's warm-up
# (batches of 1 and 2 at its size) and one more size.
MAX_SHAPES = 8


def enabled(flag: bool = True) -> bool:
    """On unless turned off, with a torch that has ahead-of-time compile (`torch.compiler.load_compiled_function`:
    2.11 and 2.13 have it; an older one runs torch.compile's path)."""
    import torch

    return (compile_cache.enabled(flag) and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")
            and hasattr(torch.compiler, "load_compiled_function"))


def _block_forward(block, x, mask, freqs, adaln=None):
    return block.forward(x, mask, freqs, adaln)


def _decoder_forward(decoder, z):
    return decoder.forward(z)


def block_family(block, x, mask, freqs, adaln=None) -> tuple[str, str]:
    """(kind, shape) of a block call: x (B, L, D)."""
    kind = "block-%s-%s" % ("mod" if block.modulation else "plain", "nomask" if mask is None else "mask")
    return kind, "b%d-l%d" % tuple(x.shape[:2])


def decoder_family(decoder, z) -> tuple[str, str]:
    """(kind, shape) of a decoder call: z (B, C, h, w)."""
    return "decoder", "b%d-%dx%d" % (z.shape[0], z.shape[2], z.shape[3])


# What a precompiled block or decoder may be built of (compile mode fuses the SwiGLU projections)
BLOCK_CLASSES = (TransformerBlock, Attention, FeedForward, FusedSwiGLU, RMSNorm, nn.Linear, nn.Sequential,
                 nn.ModuleList)
DECODER_CLASSES = (vae_models.Decoder, vae_models.MidBlock, vae_models.ResnetBlock2D, vae_models.SpatialSelfAttention,
                   vae_models.UpDecoderBlock2D, vae_models.Upsample2D, nn.Conv2d, nn.GroupNorm, nn.Linear,
                   nn.ModuleList)


def qualifies(module, allowed: tuple[type, ...]) -> bool:
    """Only modules built wholly of `allowed` classes, without hooks: the compiled function calls `forward`
    directly (no hooks run), and other layers (runtime LoRA slots, fp8) read state its guards do not cover."""
    for sub in module.modules():
        if type(sub) not in allowed:
            return False
        if sub._forward_hooks or sub._forward_pre_hooks:
            return False
    return True


class Precompiled:
    """The precompiled functions of one compiled setup (one `slot` of compile_cache), loaded or compiled per
    family on first use; `save()` writes the ones compiled in this process."""

    def __init__(self, slot: str, key: dict, folder: Path | None = None):
        self.folder = (folder or compile_cache.artifacts_dir()) / slot
        self.key = key
        self.functions: dict[str, object] = {}  # family -> torch's AOTCompiledFunction, or None: use torch.compile
        self.status: dict[str, str] = {}  # family -> loaded | compiled | stale | corrupt | failed | saved
        self.seconds: dict[str, float] = {}  # family -> seconds its load or compile took (logs, benchmarks)
        self._pending: dict[str, bytes] = {}  # family -> serialised function compiled here, not yet written
        self._refused: set[str] = set()  # families whose refusal was logged
        self._kinds: dict[str, set[str]] = {}  # kind -> its families with a function
        self._full: set[str] = set()  # kinds at MAX_SHAPES whose fallback was logged
        import torch

        self.threads = torch.get_num_threads()

    def path(self, family: str) -> Path:
        return self.folder / (family + SUFFIX)

    def function(self, kind: str, shape: str, forward, module, args: tuple):
        """The function for `kind` at `shape`: loaded from its file, else compiled from this call's `args`; None if
        it can be neither or the kind has MAX_SHAPES functions already (the caller then runs torch.compile's path)."""
        family = f"{kind}.{shape}"
        if family in self.functions:
            return self.functions[family]
        if len(self._kinds.get(kind, ())) >= MAX_SHAPES:
            if kind not in self._full:
                self._full.add(kind)
                log.info("precompiled %s: %d shapes precompiled; torch.compile runs other shapes (%s)", kind,
                         MAX_SHAPES, shape)
            return None
        t0 = time.perf_counter()
        fn = None if self.status.get(family) in ("stale", "corrupt") else self._load(family)  # (preload tried it)
        if fn is None:
            fn = self._compile(family, forward, module, args)
        self._add(family, fn, time.perf_counter() - t0)
        return fn

    def _add(self, family: str, fn, seconds: float) -> None:
        self.functions[family] = fn
        self.seconds[family] = seconds
        if fn is not None:
            fn.disable_guard_check()  # the caller checks them itself, to fall back instead of raising
            self._kinds.setdefault(family.partition(".")[0], set()).add(family)

    def preload(self) -> int:
        """Load the functions earlier processes saved for this slot, the newest MAX_SHAPES per kind (the engine
        does it while it loads, so a first image does not pay for torch's deserialisation and the imports it
        needs). Returns how many loaded."""
        if not self.folder.is_dir():
            return 0
        import torch

        files = sorted(self.folder.glob("*" + SUFFIX), key=lambda p: p.stat().st_mtime, reverse=True)
        n = 0
        for path in files:
            family = path.name[:-len(SUFFIX)]
            if family in self.functions or len(self._kinds.get(family.partition(".")[0], ())) >= MAX_SHAPES:
                continue
            t0 = time.perf_counter()
            # Inside inference mode, as every call is (PrecompiledCall): the tensor guards read the thread's
            # dispatch-key state when they are built, and built outside it they refuse every inference tensor.
            with torch.inference_mode():
                fn = self._load(family)
            if fn is not None:
                self._add(family, fn, time.perf_counter() - t0)
                n += 1
        return n

    def refused(self, family: str, fn, module, args) -> None:
        """Log (once per family) that the family's function refused a call, and why."""
        if family in self._refused:
            return
        self._refused.add(family)
        try:
            reason = fn._artifacts.guard_manager.check_verbose(fn.prepare_f_locals(module, *args)).verbose_code_parts
        except Exception:  # noqa: BLE001 - torch's internals differ between versions; the reason is only for the log
            reason = ["(reason unavailable)"]
        log.info("precompiled %s: its guards refuse a call (%s); torch.compile runs such calls", family,
                 "; ".join(str(r).strip() for r in reason)[:300])

    def _file_key(self, family: str) -> dict:
        # torch's thread count is in every compiled function's guards (a CPU kernel bakes it in): another count
        # would refuse every call, so a file made under one is stale under another and compiled again
        return {**self.key, "precompiled": family, "threads": self.threads}

    def _load(self, family: str):
        path = self.path(family)
        if not path.exists():
            return None
        try:
            key, segments = compile_cache.read_file(path)
        except (OSError, compile_cache.CorruptArtifacts) as e:
            self.status[family] = "corrupt"
            log.warning("precompiled %s: %s is unreadable (%s); compiled again", family, path, e)
            return None
        if key != self._file_key(family) or len(segments) != 1:
            self.status[family] = "stale"
            log.info("precompiled %s: %s was made for another build; compiled again", family, path)
            return None
        import torch

        try:
            fn = torch.compiler.load_compiled_function(io.BytesIO(segments[0].data))
        except Exception as e:  # noqa: BLE001 - a file torch cannot read is compiled again, never a failed image
            self.status[family] = "corrupt"
            log.warning("precompiled %s: torch could not load %s (%s: %s); compiled again", family, path,
                        type(e).__name__, e)
            return None
        self.status[family] = "loaded"
        log.info("precompiled %s: loaded from %s", family, path)
        return fn

    def _compile(self, family: str, forward, module, args: tuple):
        import torch

        t0 = time.perf_counter()
        try:
            # enable_aot_compile: .aot_compile exists behind it in torch 2.11 (on by default from 2.13); restored
            with torch._dynamo.config.patch(enable_aot_compile=True):
                fn = torch.compile(forward, fullgraph=True, dynamic=False).aot_compile(((module, *args), {}))
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{family}.{os.getpid()}.raw"
            try:
                fn.save_compiled_function(str(tmp))
                self._pending[family] = tmp.read_bytes()
            finally:
                tmp.unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - torch.compile's own path runs this family instead
            self.status[family] = "failed"
            log.warning("precompiled %s: ahead-of-time compile failed (%s: %s); using torch.compile", family,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return None
        self.status[family] = "compiled"
        log.info("precompiled %s: compiled in %.1fs", family, time.perf_counter() - t0)
        return fn

    def save(self) -> int:
        """Write the functions compiled since the last save; returns how many were written."""
        written = 0
        for family, data in list(self._pending.items()):
            try:
                segment = compile_cache.segment(data, [("precompiled", family)])
                size = compile_cache.write_file(self.path(family), self._file_key(family), [segment])
            except OSError as e:
                log.warning("precompiled %s: saving to %s failed (%s)", family, self.path(family), e)
                continue
            del self._pending[family]
            self.status[family] = "saved"
            written += 1
            log.info("precompiled %s: saved to %s (%.1f MB)", family, self.path(family), size / 1e6)
        return written


class PrecompiledCall:
    """Installed as a compiled module's `_compiled_call_impl` (what nn.Module.__call__ runs): the precompiled
    function of the call's family where it applies, else `fallback` (torch.compile's callable for the module).
    `family(module, *args)` -> (kind, shape)."""

    def __init__(self, module, store: Precompiled, forward, family, fallback, allowed: tuple[type, ...]):
        self.module, self.store, self.forward, self.family, self.fallback = module, store, forward, family, fallback
        self.allowed = allowed
        # qualifies(module, allowed), decided at the first call: the engine adds some hooks after apply_speed
        # (fp16's overflow guard), and a module is not rebuilt between calls without apply_speed installing anew
        self.eligible: bool | None = None
        self.calls = {"precompiled": 0, "fallback": 0}  # for tests and logs

    def __call__(self, *args, **kwargs):
        import torch

        if self.eligible is None:
            self.eligible = qualifies(self.module, self.allowed)
        if kwargs or not self.eligible or not torch.is_inference_mode_enabled():
            return self._fall_back(args, kwargs)
        kind, shape = self.family(self.module, *args)
        fn = self.store.function(kind, shape, self.forward, self.module, args)
        if fn is None:
            return self._fall_back(args, kwargs)
        if not fn.guard_check(self.module, *args):
            self.store.refused(f"{kind}.{shape}", fn, self.module, args)
            return self._fall_back(args, kwargs)
        self.calls["precompiled"] += 1
        return fn(self.module, *args)

    def _fall_back(self, args, kwargs):
        self.calls["fallback"] += 1
        return self.fallback(*args, **kwargs)


def install(transformer, vae, device, store: Precompiled) -> None:
    """Route the compiled blocks (and, on CUDA, the compiled decoder) through `store`; call after compile_blocks."""
    for block in transformer.blocks():
        block._compiled_call_impl = PrecompiledCall(block, store, _block_forward, block_family,
                                                    block._compiled_call_impl, BLOCK_CLASSES)
    decoder = vae.decoder
    if getattr(decoder, "_compiled_call_impl", None) is not None and device.type == "cuda":
        decoder._compiled_call_impl = PrecompiledCall(decoder, store, _decoder_forward, decoder_family,
                                                      decoder._compiled_call_impl, DECODER_CLASSES)
