"""Portable compile artifacts ("mega-cache"): a later process's compilation costs a file read, not a compile.

Inductor's local caches (FX graphs, AOTAutograd entries, Triton kernels under TORCHINDUCTOR_CACHE_DIR) already
skip code generation in a second process, but each entry is still looked up, and a fresh machine or container has
none. PyTorch's portable caches bundle every entry a process compiled or hit into one blob
(`torch.compiler.save_cache_artifacts()`), which a later process hot-loads into its local caches
(`torch.compiler.load_cache_artifacts(blob)`) before it compiles: its compiles then hit. Dynamo still traces each
block's bytecode (seconds), but nothing is code-generated or built again.

One file per configuration, in zimage's cache next to the inductor folder (zimage.speed.apply.compile_cache_dir):

    <zimage cache>/compile-artifacts/<slot>.zca

`slot` hashes what is compiled: device (GPU name and compute capability, or the CPU's architecture), dtypes, the
speed setup (mode, attention backend, fused projections, which graphs), the transformer's config and structure
(module classes, parameter shapes and dtypes: fp8 and runtime LoRA layers compile other graphs). The file's header
holds the whole key: those, plus the build (torch incl. CUDA/HIP, Triton, Python) and a hash of zimage's own model
and speed source (zimage/models, zimage/speed), so an edited forward or an upgraded torch never loads a stale
artifact: a header whose key differs is not loaded, and the file is overwritten once this process has compiled.
(Inductor's own keys hash the graphs too: a stale entry could never be used wrongly, only uselessly.) A file that
cannot be read (truncated, a bad checksum, not ours) is ignored with a warning and rebuilt. Writes go to a temporary
file renamed over the old one (os.replace): a reader sees the old file or the new one, never half of one.

When: `load()` at the engine's first compiled run (inside SpeedSetup.scoped, so the entries land in the inductor
folder that run compiles with); `save()` after each compiled run, which writes only when the run compiled (or hit)
entries that the file does not hold yet: the first compiled generation (the server's warm-up), then a new size or
batch size. The file keeps the segments of earlier processes that hold entries this one did not use, so a process
that makes only 1024x1024 images does not drop the 512x512 graphs an earlier one saved (at most MAX_SEGMENTS).

Off with EngineConfig(compile_cache=False) or ZIMAGE_COMPILE_CACHE=0 (inductor's local caches still work).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("zimage")

ENV = "ZIMAGE_COMPILE_CACHE"  # "0" / "false" / "no" / "off": neither load nor save
MAGIC = b"ZIMAGE-COMPILE-ARTIFACTS 1\n"
SUFFIX = ".zca"
MAX_SEGMENTS = 8
SOURCE_PACKAGES = ("models", "speed")  # zimage's code that compiled graphs are traced from

_populated: set[str] = set()  # sha256 of the segments this process has already loaded into its local caches


class CorruptArtifacts(ValueError):
    """The file is not a whole, well-formed artifact file."""


def enabled(flag: bool = True) -> bool:
    return flag and os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def artifacts_dir() -> Path:
    from zimage.weights.locate import zimage_cache

    return zimage_cache() / "compile-artifacts"


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 of zimage's model and speed source files (names and contents)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def build_id() -> dict:
    """The software that compiled: torch (with its CUDA / HIP), Triton, Python."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - CPU builds have no Triton
        triton_version = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "triton": triton_version, "python": "%d.%d" % sys.version_info[:2]}


def device_id(device) -> dict:
    """The hardware the kernels are for: GPU name and compute capability, or the CPU's architecture."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    if device.type == "cpu":
        return {"type": "cpu", "machine": platform.machine()}
    return {"type": device.type}


def structure_digest(modules) -> str:
    """sha256 of the modules' classes, parameter and buffer shapes and dtypes (not their values)."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, sub in module.named_modules():
            h.update(f"{i}.{name}:{type(sub).__module__}.{type(sub).__qualname__}\n".encode())
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            h.update(f"{i}.{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
    return h.hexdigest()


def compile_key(transformer, vae, device, speed: dict) -> tuple[str, dict]:
    """(slot, key): the file's name and the full key its header must match. `speed` describes the setup."""
    graphs = list(transformer.blocks()) + ([vae.decoder] if "vae_decoder" in speed.get("graphs", ()) else [])
    dtypes = sorted({str(p.dtype) for m in graphs for p in m.parameters()})
    what = {"device": device_id(device), "dtypes": dtypes, "speed": speed,
            "config": json.loads(json.dumps(getattr(transformer, "config", {}), sort_keys=True, default=str)),
            "structure": structure_digest(graphs)}
    slot = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    key = {**what, "build": build_id(), "source": source_digest()}
    return slot, json.loads(json.dumps(key, sort_keys=True))  # as the header reads back (tuples become lists)


@dataclass
class Segment:
    data: bytes  # what torch.compiler.save_cache_artifacts returned in one process
    artifacts: frozenset  # (type, key) of the entries it holds
    sha256: str


def segment(data: bytes, artifacts) -> Segment:
    """A Segment of `data`, holding the (type, key) `artifacts`, with its checksum."""
    return Segment(data, frozenset(artifacts), hashlib.sha256(data).hexdigest())


def read_file(path: Path) -> tuple[dict, list[Segment]]:
    """(key, segments) of an artifact file; CorruptArtifacts if it is not a whole, well-formed one."""
    blob = path.read_bytes()
    if not blob.startswith(MAGIC):
        raise CorruptArtifacts("not a zimage compile-artifact file")
    end = blob.find(b"\n", len(MAGIC))
    if end < 0:
        raise CorruptArtifacts("no header")
    try:
        header = json.loads(blob[len(MAGIC):end])
        key, entries = header["key"], header["segments"]
        segments, offset = [], end + 1
        for e in entries:
            data = blob[offset:offset + int(e["size"])]
            offset += len(data)
            if len(data) != int(e["size"]) or hashlib.sha256(data).hexdigest() != e["sha256"]:
                raise CorruptArtifacts("a segment is truncated or its checksum differs")
            segments.append(segment(data, (tuple(a) for a in e["artifacts"])))
    except CorruptArtifacts:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptArtifacts(f"bad header ({e.__class__.__name__}: {e})") from None
    if offset != len(blob):
        raise CorruptArtifacts("trailing bytes")
    return key, segments


def write_file(path: Path, key: dict, segments: list[Segment]) -> int:
    """Write atomically (a temporary file, then os.replace); returns the bytes written."""
    header = {"key": key, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "segments": [
        {"size": len(s.data), "sha256": s.sha256, "artifacts": sorted(list(a) for a in s.artifacts)}
        for s in segments]}
    head = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for s in segments:
                f.write(s.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(head) + sum(len(s.data) for s in segments)


def _differing(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class CompileArtifacts:
    """The artifact file of one compiled setup: `load()` once before its first compiled run, `save()` after runs."""

    def __init__(self, slot: str, key: dict, folder: Path | None = None):
        self.key = key
        self.path = (folder or artifacts_dir()) / (slot + SUFFIX)
        self.tried = False
        self.loaded: dict[str, int] = {}  # artifacts loaded, per type (torch's CacheInfo), for logs and tests
        self.status = "not tried"  # absent | loaded | stale | corrupt | failed
        self.saves = 0
        self._kept: list[Segment] = []  # the file's valid segments (kept when saving)

    def load(self) -> int:
        """Hot-load the file's artifacts into inductor's local caches (once). Returns how many were loaded."""
        if self.tried:
            return sum(self.loaded.values())
        self.tried = True
        if not self.path.exists():
            self.status = "absent"
            log.debug("compile cache: no artifacts at %s yet", self.path)
            return 0
        t0 = time.perf_counter()
        try:
            key, segments = read_file(self.path)
        except (OSError, CorruptArtifacts) as e:
            self.status = "corrupt"
            log.warning("compile cache: %s is unreadable (%s); ignored, it is rebuilt after this run", self.path, e)
            return 0
        if key != self.key:
            self.status = "stale"
            log.info("compile cache: %s was made for another build (%s differ); not loaded, rebuilt", self.path,
                     ", ".join(_differing(key, self.key)))
            return 0
        import torch

        for s in segments:
            if s.sha256 in _populated:
                info_counts = {}
            else:
                try:
                    info = torch.compiler.load_cache_artifacts(s.data)
                except Exception as e:  # noqa: BLE001 - a bad cache must never stop a generation
                    info = None
                    log.warning("compile cache: loading %s failed (%s: %s); ignored", self.path, type(e).__name__, e)
                if info is None:
                    self.status = "failed"
                    log.warning("compile cache: torch could not read a segment of %s; ignored", self.path)
                    continue
                _populated.add(s.sha256)
                info_counts = {t: len(keys) for t, keys in info.artifacts.items()}
            for t, n in info_counts.items():
                self.loaded[t] = self.loaded.get(t, 0) + n
            self._kept.append(s)
        if self.status != "failed":
            self.status = "loaded"
        n = sum(self.loaded.values())
        log.info("compile cache: %d artifacts loaded from %s in %.2fs (%s)", n, self.path, time.perf_counter() - t0,
                 ", ".join(f"{v} {t}" for t, v in sorted(self.loaded.items())) or "already loaded")
        return n

    def save(self) -> bool:
        """After a compiled run: write the file if this process compiled (or hit) entries it does not hold."""
        if not self.tried:
            return False
        try:
            import torch
            from torch.compiler._cache import CacheArtifactManager

            need = getattr(CacheArtifactManager, "need_serialize", None)
            if need is not None and not need() and (self.saves or self.status == "loaded"):
                return False  # nothing compiled or looked up since the last save: no serialisation cost
            # (torch records an entry once per process: a second engine's first run may add nothing new, and its
            # file, absent, stale or corrupt, is still written from what the process holds)
            result = torch.compiler.save_cache_artifacts()
            if result is None:
                return False
            data, info = result
            mine = segment(data, ((t, k) for t, keys in info.artifacts.items() for k in keys))
            held = frozenset().union(*(s.artifacts for s in self._kept))
            if mine.artifacts <= held:
                return False
            # this process's segment (cumulative: it replaces its earlier one), after the earlier processes' ones
            # that hold something it does not
            kept = [s for s in self._kept if not s.artifacts <= mine.artifacts][-(MAX_SEGMENTS - 1):]
            t0 = time.perf_counter()
            size = write_file(self.path, self.key, kept + [mine])
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written is a warning, not a failed image
            log.warning("compile cache: saving to %s failed (%s: %s)", self.path, type(e).__name__, e)
            return False
        self._kept = kept + [mine]
        self.saves += 1
        log.info("compile cache: %d artifacts saved to %s (%.1f MB, %.2fs)", len(mine.artifacts), self.path,
                 size / 1e6, time.perf_counter() - t0)
        return True
