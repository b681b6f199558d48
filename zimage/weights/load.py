"""Loading checked networks: tensors read straight to the target device, cast there, assigned into the meta-built
module (no random init, no second copy in host memory). To a GPU through pinned staging buffers
(zimage.weights.pinned_read); to host memory with safetensors' mmap."""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from pathlib import Path

from zimage.weights.check import CheckedNetwork

log = logging.getLogger("zimage")


# Reads in parallel: one thread copies ~2-3 GB/s out of the page cache. H200 host (16 cores), 24.6 GB fp32
# transformer from the page cache: 4 threads 1.82 s, 8 1.20 s, 12 1.16 s, 16 0.95 s, 24 1.15 s.
READ_THREADS = min(16, os.cpu_count() or 1)
PINNED_READS = True  # GPU targets through pinned staging buffers (False: safetensors; the benchmarks compare)
LAST_STATS: dict = {}  # seconds and bytes of the last load_network per network (benchmarks report them)


def prepare_reads(device) -> None:
    """Call once the device is known, before checking the model: GPU reads get their pinned buffers early."""
    import torch

    if PINNED_READS and torch.device(device).type == "cuda":
        from zimage.weights.pinned_read import prewarm

        prewarm(READ_THREADS)


def load_network(checked: CheckedNetwork, device, dtype, progress=None, converted_cache: bool = False):
    """Materialise `checked.network.module` on `device` in `dtype`. `progress(nbytes)` is called as bytes are read.

    Tensors are read by up to READ_THREADS threads (each a slice of the tensors, in file order), each straight to
    `device` and cast there (to a GPU through pinned buffers unless PINNED_READS is off).
    With `converted_cache`, a copy already in `dtype` is read instead when one exists for exactly these source
    files (zimage.weights.converted), and written after the first load otherwise.
    Returns the module in eval mode with gradients off.
    """
    import time

    from zimage.weights import converted

    t0 = time.perf_counter()
    converted_cache = converted_cache and converted.differs(checked, dtype)
    source = checked
    cached = converted.find(checked, dtype) if converted_cache else None
    if cached is not None:
        source = cached
    module = checked.network.module
    state, threads = _read(source, device, dtype, progress)
    origin = "converted cache" if cached is not None else "source"
    module.load_state_dict(state, strict=True, assign=True)
    _check_materialized(module)
    module.requires_grad_(False)
    module.eval()
    if converted_cache and cached is None:
        converted.write(checked, dtype, state)
    name, seconds = checked.network.component.name, time.perf_counter() - t0
    LAST_STATS[f"{name}_s"] = seconds
    LAST_STATS[f"{name}_from"] = origin
    nbytes = source.nbytes
    log.debug("%s loaded to %s in %.2fs: %.2f GB from the %s at %.1f GB/s by %d thread(s)", name, device, seconds,
              nbytes / 1e9, origin, nbytes / 1e9 / max(seconds, 1e-9), threads)
    return module


def _read(source: CheckedNetwork, device, dtype, progress) -> tuple[dict, int]:
    """({module name: tensor}, threads used): read from `source`'s files by up to READ_THREADS threads, each straight
    to `device` and cast there (to a GPU through pinned buffers unless PINNED_READS is off)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import torch

    read_device = str(device) if torch.device(device).type in ("cuda", "cpu") else "cpu"
    lock = threading.Lock()

    def locked_progress(nbytes):
        with lock:
            progress(nbytes)

    def read(task):
        from safetensors import safe_open

        out = {}
        path, names = task
        if PINNED_READS and torch.device(device).type == "cuda":
            from zimage.weights.pinned_read import read_tensors

            items = [(target, source.tensors[target][1]) for _, target in names]
            return read_tensors(items, device, dtype, locked_progress if progress is not None else None)
        with safe_open(str(path), framework="pt", device=read_device) as f:
            for stored, target in names:
                t = f.get_tensor(stored)
                if t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                out[target] = t.to(device)
                if progress is not None:
                    locked_progress(t.numel() * t.element_size())
        return out

    tasks = _slices(source, READ_THREADS)
    threads = max(1, min(READ_THREADS, len(tasks)))
    state: dict[str, torch.Tensor] = {}
    with ThreadPoolExecutor(threads) as pool:
        for part in pool.map(read, tasks):
            state.update(part)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # reads and casts are done (for the timing below)
    return state, threads


def _slices(checked: CheckedNetwork, n: int) -> list[tuple[Path, list[tuple[str, str]]]]:
    """Split the tensors into about `n` tasks of similar bytes, each within one file: [(file, [(stored, target)])]."""
    by_file: dict[Path, list[tuple[str, str, int]]] = defaultdict(list)
    total = 0
    for target, (stored, info) in checked.tensors.items():
        numel = math.prod(info.shape)
        by_file[info.file].append((stored, target, numel))
        total += numel
    share = max(total // max(n, 1), 1)
    tasks = []
    for path, items in by_file.items():
        chunk, size = [], 0
        for stored, target, numel in items:
            chunk.append((stored, target))
            size += numel
            if size >= share:
                tasks.append((path, chunk))
                chunk, size = [], 0
        if chunk:
            tasks.append((path, chunk))
    return tasks


def _check_materialized(module) -> None:
    """zimage.models have no buffers and every parameter is in the checkpoint: nothing may be left on meta."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")


def read_original(checked: CheckedNetwork, names, dtype) -> dict:
    """{module tensor name: tensor} of `names` (e.g. 'layers.3.attention.to_k.weight') read again from the checkpoint
    into host memory and cast to `dtype` as at load: what undoing a merged LoRA puts back (zimage.weights.lora.merge)."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)
    for name in names:
        stored, info = checked.tensors[name]
        by_file[info.file].append((stored, name))
    out = {}
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for stored, name in items:
                t = f.get_tensor(stored)
                out[name] = t.to(dtype) if t.is_floating_point() else t
    return out
