"""Reading safetensors tensors into GPU memory through pinned staging buffers, cast to the compute dtype on the GPU.

Why not safetensors' own `safe_open(device="cuda")`: it maps the file, wraps the bytes in a pageable CPU tensor and
calls `.to("cuda")`, so every byte crosses the bus at the pageable rate (7.8 GiB/s measured on an H200 host, against
51.5 GiB/s from pinned memory) and an fp32 tensor lands on the GPU whole before it is cast (a transient of its full
fp32 size). Here each reading thread owns two pinned host buffers of CHUNK bytes (16 MiB) and two GPU buffers of
the same size, and alternates between them:

    pread(file, chunk k)  -> pinned[k % 2]          (host, the GIL released; reads the page cache or the disk)
    pinned[k % 2]         -> gpu[k % 2]              (async copy on the thread's own stream, at the pinned rate)
    gpu[k % 2]            -> out[elements of chunk k] (cast kernel on the same stream: fp32 -> bf16)

so the read of chunk k+1 overlaps the copy and cast of chunk k, and the GPU never holds more than 2 x CHUNK of a
tensor in its stored dtype. A chunk is a whole number of elements, so each is cast on its own. When the stored
dtype is the compute dtype the bytes are copied straight into the output tensor.

The outputs and the GPU buffers are allocated on the reading stream, where they are written: PyTorch's caching
allocator only orders a reused block after earlier work on its own stream, and the generating thread runs work on
the default stream while the model loads (zimage.engine.warm_start): a block it just freed, with a kernel still
writing it, must not become a weight written from another stream (it did: NaN weights).

On a CPU device (tests; zimage loads CPU-bound networks with safetensors' mmap) the same code runs with plain
buffers and synchronous copies.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading

from zimage.weights.safetensors_files import DTYPES

# Bytes per staging buffer. Pinning host memory is slow, ~1.4 GB/s on an H200 host (2 x 16 MiB for 16 threads: 0.36 s,
# once per process, overlapping the model folder's checks). 8 MiB buffers pin in 0.25 s but read 24.6 GB in 1.3 s
# against 1.0 s (more Python per byte, under the GIL with the warm start): 16 MiB.
CHUNK = 16 * 2**20

log = logging.getLogger("zimage")

_prewarm: threading.Thread | None = None  # the thread pinning staging buffers ahead of the first read


def prewarm(readers: int, chunk: int = CHUNK) -> None:
    """Pin the staging buffers of `readers` reading threads in the background, then free them into PyTorch's
    pinned-memory cache, where the first read_tensors calls find them. Started before the model folder is checked,
    pinning overlaps that work instead of the first read.
    Idempotent; read_tensors waits for it."""
    global _prewarm
    if _prewarm is not None:
        return

    def pin():
        import time

        import torch

        t = time.perf_counter()
        buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2 * readers)]
        del buffers  # back to the cache, still pinned
        log.debug("pinned %d staging buffers of %d MiB (%.2fs)", 2 * readers, chunk >> 20, time.perf_counter() - t)

    _prewarm = threading.Thread(target=pin, name="zimage-pin-staging", daemon=True)
    _prewarm.start()



def read_tensors(items, device, dtype, progress=None, chunk: int = CHUNK) -> dict:
    """Read `items` = [(target name, TensorInfo)], all from one file, into tensors on `device`.

    Floating-point tensors are cast to `dtype` (on the device); others keep their stored dtype. `progress(nbytes)`
    is called per chunk read. Returns {target name: tensor}; on CUDA, every copy and cast has finished.
    """
    import torch

    device = torch.device(device)
    if chunk <= 0 or chunk % 8:
        raise ValueError(f"chunk must be a positive multiple of 8 bytes, got {chunk}")
    if not items:
        return {}
    path = items[0][1].file
    cuda = device.type == "cuda"
    if cuda and _prewarm is not None:
        _prewarm.join()  # take the buffers it pinned rather than pinning more
    stream = _take_stream(device) if cuda else None
    try:
        return _read(items, device, dtype, progress, chunk, path, stream)
    finally:
        if cuda:
            _streams[device].put(stream)


def _read(items, device, dtype, progress, chunk, path, stream) -> dict:
    import torch

    cuda = stream is not None
    allocate = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    views = [memoryview(b.numpy()) for b in staging]  # pread writes straight into the (pinned) buffers
    landing = [None, None]  # GPU buffers for chunks that are cast (allocated at the first such chunk)
    done = [None, None]  # CUDA events: staging[i] and landing[i] are free again once done[i] has completed
    out = {}
    k = 0  # chunk counter: buffer k % 2
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, info in items:
            stored = getattr(torch, DTYPES[info.dtype][0])
            target = dtype if stored.is_floating_point else stored
            with allocate:  # from the reading stream's pool (see the module doc)
                t = torch.empty(info.shape, dtype=target, device=device)
            nbytes = info.end - info.begin
            expected = t.numel() * stored.itemsize
            if nbytes != expected:
                raise ValueError(f"{path}: tensor {name} has {nbytes} bytes for shape {info.shape} {info.dtype} "
                                 f"(expected {expected})")
            flat = t.view(-1)
            per_chunk = chunk - chunk % stored.itemsize  # whole elements
            for start in range(0, nbytes, per_chunk):
                n = min(per_chunk, nbytes - start)
                i = k % 2
                k += 1
                if done[i] is not None:
                    done[i].synchronize()  # the copy (and cast) that used these buffers has finished
                _pread_exactly(fd, views[i][:n], info.begin + start, path)
                e0, e1 = start // stored.itemsize, (start + n) // stored.itemsize  # elements of this chunk
                src = staging[i][:n]
                if target == stored:  # bytes straight into place
                    dst = flat[e0:e1].view(torch.uint8)
                    if cuda:
                        with torch.cuda.stream(stream):
                            dst.copy_(src, non_blocking=True)
                    else:
                        dst.copy_(src)
                else:  # land the stored bytes on the device, then cast them into place
                    if cuda:
                        with torch.cuda.stream(stream):
                            if landing[i] is None:
                                landing[i] = torch.empty(chunk, dtype=torch.uint8, device=device)
                            land = landing[i][:n]
                            land.copy_(src, non_blocking=True)
                            flat[e0:e1].copy_(land.view(stored))
                    else:
                        flat[e0:e1].copy_(src.view(stored))
                if cuda:
                    done[i] = torch.cuda.Event()
                    done[i].record(stream)
                if progress is not None:
                    progress(n)
            out[name] = t
        if cuda:
            stream.synchronize()  # every output is complete before another stream reads it
            consumer = torch.cuda.current_stream(device)  # the default stream, where the engine computes
            for t in out.values():
                t.record_stream(consumer)  # freed later: not reused while the engine's kernels may still read it
    finally:
        os.close(fd)
    return out


_streams: dict = {}  # device -> SimpleQueue of reading streams, reused by later reads (their pools with them)
_streams_lock = threading.Lock()


def _take_stream(device):
    """A reading stream of `device`: one given back by an earlier read, else a new one. Reusing them bounds the
    GPU buffers cached in their pools to 2 x CHUNK per concurrent reader."""
    import torch

    with _streams_lock:
        free = _streams.setdefault(device, queue.SimpleQueue())
    try:
        return free.get_nowait()
    except queue.Empty:
        return torch.cuda.Stream(device)


def _pread_exactly(fd: int, view: memoryview, offset: int, path) -> None:
    """Fill `view` from `offset` of the file (pread may return less than asked: loop)."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise OSError(f"{path} ended at byte {offset + got} while reading a tensor (truncated since it was checked?)")
        got += n
