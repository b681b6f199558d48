"""Reading the weights into GPU memory while `import torch` runs (cold start), through the CUDA driver API.

`import torch` takes ~3 s (its CUDA libraries) and the reads of the published model (32.8 GB from the page cache,
~1.3 s) could only start after it. So the CLI starts this reader first (zimage.cli.generate): threads read each
safetensors file's data section into one GPU buffer per file,

    pread(file, chunk) -> pinned staging buffer -> cuMemcpyHtoDAsync on the thread's stream,

in the device's primary context, the one torch's runtime uses later (ctypes over libcuda.so.1; ctypes and pread
release the GIL, so the import goes on meanwhile). Once torch is in, zimage.weights.load takes each network's
tensors from these buffers with a device-to-device copy into torch's allocator (the cast, e.g. fp32 -> bf16, on the
GPU at its memory bandwidth), then frees the buffers. The result is the same tensors as the normal reader's.

Only where it cannot hurt: Linux with an NVIDIA driver, a CUDA device, no --vram-budget (the buffers are outside
torch's allocator), no --converted-cache (that reads other files), and a GPU whose free memory holds every file plus
the largest network again plus a margin. Any failure is logged and leaves the work to the normal reader.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("zimage")

CHUNK = 16 * 2**20  # bytes per staging buffer (two per thread)
MARGIN = 4 * 2**30  # GPU bytes left free beyond the buffers and the copies taken from them

_active: "EarlyReads | None" = None  # the reader this process started, if any
_decided = threading.Event()  # set once start()'s thread has decided whether to read (or no thread was started)
_decided.set()


@dataclass
class FileBuffer:
    """One safetensors file's data section, bound for one GPU buffer."""

    path: Path  # resolved
    data_start: int  # byte offset of the data section in the file
    nbytes: int  # bytes of the data section
    pointer: int = 0  # device address once allocated
    pending: int = 0  # chunks not landed yet
    done: threading.Event = field(default_factory=threading.Event)


class CudaDriver:
    """The few CUDA driver calls the reader makes (ctypes over libcuda.so.1); each raises on a non-zero CUresult."""

    def __init__(self, library: str = "libcuda.so.1"):
        self.lib = ctypes.CDLL(library)
        self.context = ctypes.c_void_p()

    def _call(self, name: str, *args) -> None:
        result = getattr(self.lib, name)(*args)
        if result != 0:
            raise RuntimeError(f"{name} returned CUresult {result}")

    def init(self, ordinal: int) -> None:
        """cuInit, then retain device `ordinal`'s primary context (the one the CUDA runtime, torch's, uses)."""
        self._call("cuInit", ctypes.c_uint(0))
        device = ctypes.c_int()
        self._call("cuDeviceGet", ctypes.byref(device), ctypes.c_int(ordinal))
        self._call("cuDevicePrimaryCtxRetain", ctypes.byref(self.context), device)
        self.bind()

    def bind(self) -> None:
        """Make the context current in the calling thread."""
        self._call("cuCtxSetCurrent", self.context)

    def free_memory(self) -> int:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
        return free.value

    def alloc(self, nbytes: int) -> int:
        pointer = ctypes.c_uint64()
        self._call("cuMemAlloc_v2", ctypes.byref(pointer), ctypes.c_size_t(nbytes))
        return pointer.value

    def free(self, pointer: int) -> None:
        self._call("cuMemFree_v2", ctypes.c_uint64(pointer))

    def host_alloc(self, nbytes: int) -> tuple[int, memoryview]:
        """Pinned host memory: (address, a writable view of it)."""
        pointer = ctypes.c_void_p()
        self._call("cuMemHostAlloc", ctypes.byref(pointer), ctypes.c_size_t(nbytes), ctypes.c_uint(0))
        return pointer.value, memoryview((ctypes.c_char * nbytes).from_address(pointer.value)).cast("B")

    def host_free(self, pointer: int) -> None:
        self._call("cuMemFreeHost", ctypes.c_void_p(pointer))

    def stream(self):
        handle = ctypes.c_void_p()
        self._call("cuStreamCreate", ctypes.byref(handle), ctypes.c_uint(1))  # CU_STREAM_NON_BLOCKING
        return handle

    def event(self):
        handle = ctypes.c_void_p()
        self._call("cuEventCreate", ctypes.byref(handle), ctypes.c_uint(2))  # CU_EVENT_DISABLE_TIMING
        return handle

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream) -> None:
        self._call("cuMemcpyHtoDAsync_v2", ctypes.c_uint64(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), stream)

    def record(self, event, stream) -> None:
        self._call("cuEventRecord", event, stream)

    def wait(self, event) -> None:
        self._call("cuEventSynchronize", event)

    def destroy(self, stream, events) -> None:
        for e in events:
            self._call("cuEventDestroy_v2", e)
        self._call("cuStreamDestroy_v2", stream)


class EarlyReads:
    """Files read into GPU buffers by `threads` threads, in the order given (the order the engine loads them)."""

    def __init__(self, driver, files: list[FileBuffer], threads: int, chunk: int = CHUNK):
        self.driver = driver
        self.files = {f.path: f for f in files}
        self.order = files
        self.threads = threads
        self.chunk = chunk
        self.error: str | None = None
        self._lock = threading.Lock()
        self._chunks = iter([(f, off, min(chunk, f.nbytes - off)) for f in files for off in range(0, f.nbytes, chunk)])
        self._fds: dict[Path, int] = {}
        self.started = time.perf_counter()

    # ------------------------------------------------------------ reading (background threads)
    def run(self) -> None:
        """Allocate the GPU buffers and read every file; returns when all have landed (or one read failed)."""
        try:
            for f in self.order:
                f.pointer = self.driver.alloc(max(f.nbytes, 1))
                f.pending = -(-f.nbytes // self.chunk)
                if f.pending == 0:
                    f.done.set()
                self._fds[f.path] = os.open(f.path, os.O_RDONLY)
            workers = [threading.Thread(target=self._worker, name=f"zimage-early-read-{i}", daemon=True)
                       for i in range(self.threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        except Exception as e:  # noqa: BLE001 - the normal reader does the work instead
            self._fail(f"{type(e).__name__}: {e}")
        finally:
            for fd in self._fds.values():
                os.close(fd)
        if self.error is None:
            total = sum(f.nbytes for f in self.order)
            seconds = time.perf_counter() - self.started
            log.debug("early read: %.2f GB of %d file(s) on the GPU in %.2fs (%.1f GB/s, %d threads)",
                      total / 1e9, len(self.order), seconds, total / 1e9 / max(seconds, 1e-9), self.threads)

    def _next(self):
        with self._lock:
            return None if self.error is not None else next(self._chunks, None)

    def _worker(self) -> None:
        d = self.driver
        staging, stream, events = [], None, []
        try:
            d.bind()
            stream = d.stream()
            events = [d.event(), d.event()]
            staging = [d.host_alloc(self.chunk) for _ in range(2)]
            landed: list = [None, None]  # the file whose chunk buffer i holds, until its copy is waited for
            k = 0
            while (item := self._next()) is not None:
                i = k % 2
                k += 1
                if landed[i] is not None:
                    d.wait(events[i])  # staging[i] is free again
                    self._landed(landed[i])
                f, offset, n = item
                _pread_exactly(self._fds[f.path], staging[i][1][:n], f.data_start + offset, f.path)
                d.copy_to_device(f.pointer + offset, staging[i][0], n, stream)
                d.record(events[i], stream)
                landed[i] = f
            for i in (k % 2, (k + 1) % 2):  # the older copy first
                if landed[i] is not None:
                    d.wait(events[i])
                    self._landed(landed[i])
        except Exception as e:  # noqa: BLE001 - the normal reader does the work instead
            self._fail(f"{type(e).__name__}: {e}")
        finally:
            for pointer, _ in staging:
                d.host_free(pointer)
            if stream is not None:
                d.destroy(stream, events)

    def _landed(self, f: FileBuffer) -> None:
        with self._lock:
            f.pending -= 1
            if f.pending == 0:
                f.done.set()

    def _fail(self, why: str) -> None:
        with self._lock:
            if self.error is None:
                self.error = why
                log.debug("early read stopped (%s); the weights are read after the import instead", why)
        for f in self.order:
            f.done.set()  # wake anyone waiting: they see the error

    # ------------------------------------------------------------ taking (the loading thread, torch imported)
    def has(self, paths) -> bool:
        return self.error is None and all(Path(p).resolve() in self.files for p in paths)

    def take(self, tensors: dict, device, dtype) -> dict | None:
        """{module name: tensor} on `device` for `tensors` = {module name: (stored name, TensorInfo)}, floating
        point ones cast to `dtype`, copied out of the GPU buffers, which are then freed; None if a read failed."""
        import torch

        buffers = {p: self.files[Path(p).resolve()] for p in {info.file for _, info in tensors.values()}}
        for f in buffers.values():
            f.done.wait()
        if self.error is not None:
            self.release_all()
            return None
        out = _copies(tensors, {p: (torch.as_tensor(_DeviceBytes(f.pointer, f.nbytes), device=device), f.data_start)
                                for p, f in buffers.items()}, dtype)
        torch.cuda.synchronize(device)  # the copies are done (and the views of the buffers gone): free them
        for f in buffers.values():
            self.release(f)
        return out

    def release(self, f: FileBuffer) -> None:
        with self._lock:
            pointer, f.pointer = f.pointer, 0
            self.files.pop(f.path, None)
        if pointer:
            self.driver.free(pointer)

    def release_all(self) -> None:
        for f in list(self.files.values()):
            self.release(f)

    def outstanding_bytes(self) -> int:
        """GPU bytes still held in buffers (the memory planner counts them as free: they are freed as taken)."""
        return sum(f.nbytes for f in self.files.values() if f.pointer)


def _copies(tensors: dict, raw: dict, dtype) -> dict:
    """{module name: copy} of each tensor in `raw` = {file: (uint8 tensor of its data section, data start)}, floating
    point ones cast to `dtype` (the copies are torch's; nothing returned shares memory with `raw`)."""
    import torch

    from zimage.weights.safetensors_files import DTYPES

    out = {}
    for target, (_, info) in tensors.items():
        data, start = raw[info.file]
        stored = getattr(torch, DTYPES[info.dtype][0])
        part = data[info.begin - start:info.end - start]
        if part.storage_offset() % stored.itemsize:
            part = part.clone()  # view(dtype) needs an offset in whole elements
        out[target] = part.view(stored).view(info.shape).to(dtype if stored.is_floating_point else stored, copy=True)
    return out


class _DeviceBytes:
    """`nbytes` of device memory at `pointer`, for torch.as_tensor (zero copy, no ownership)."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (pointer, False),
                                         "version": 3, "strides": None, "stream": None}


def active() -> EarlyReads | None:
    """The early reader, once its thread has decided to read (a wait of milliseconds after the driver's init);
    None when there is none."""
    _decided.wait()
    return _active


def finish() -> None:
    """Free whatever the engine did not take (a failed load): the buffers are not torch's to reuse."""
    if _active is not None:
        _active.release_all()


def plan_files(folder: Path) -> list[FileBuffer]:
    """Every weights file of the model folder, in loading order (VAE, text encoder, transformer), with its data
    section's place in the file. Raises ModelFolderError for a damaged folder (the engine reports it later)."""
    import json
    import struct

    from zimage.weights.layout import TEXT_ENCODER, TRANSFORMER, VAE
    from zimage.weights.safetensors_files import shard_files

    files = []
    for component in (VAE, TEXT_ENCODER, TRANSFORMER):
        for path in shard_files(folder / component.name, component.weights_stem):
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            end = max((v["data_offsets"][1] for v in header.values()), default=0)
            files.append(FileBuffer(path.resolve(), 8 + n, end))
    return files


def start(model: str, device: str, threads: int, allowed: bool = True,
          driver_factory=CudaDriver) -> threading.Thread | None:
    """From the CLI, before torch is imported. For `device` auto | cuda | cuda:N on Linux: a daemon thread that
    initialises the CUDA driver (cuInit: ~0.2 s, paid here instead of after the import), then, if `allowed` and the
    GPU has room, reads `model`'s weights into GPU buffers (EarlyReads). None on other platforms or devices."""
    kind, _, index = device.partition(":")
    if not sys.platform.startswith("linux") or kind not in ("auto", "cuda") or (index and not index.isdigit()):
        return None
    _decided.clear()
    thread = threading.Thread(target=_start, args=(model, int(index or 0), threads, allowed, driver_factory),
                              name="zimage-early-read", daemon=True)
    thread.start()
    return thread


def _start(model: str, ordinal: int, threads: int, allowed: bool, driver_factory) -> None:
    try:
        reads = _decide(model, ordinal, threads, allowed, driver_factory)
    finally:
        _decided.set()
    if reads is not None:
        reads.run()


def _decide(model: str, ordinal: int, threads: int, allowed: bool, driver_factory) -> EarlyReads | None:
    """Initialise the driver; an EarlyReads (made the active one) if the weights should be read early."""
    global _active
    try:
        driver = driver_factory()
        driver.init(ordinal)
    except Exception as e:  # noqa: BLE001 - no driver or no such GPU: torch reports it when the device is resolved
        log.debug("early read: no CUDA driver here (%s)", e)
        return None
    if not allowed:
        return None
    try:
        from zimage.weights.locate import locate_model
        from zimage.weights.layout import TINY_MODEL_ID

        if model == TINY_MODEL_ID:
            return None  # built on first use, and tiny: nothing to gain
        files = plan_files(locate_model(model).path)
        total = sum(f.nbytes for f in files)
        need = total + _largest_component(files) + MARGIN
        free = driver.free_memory()
        if free < need:
            log.debug("early read: skipped, %.1f GB free on the GPU, %.1f GB needed", free / 1e9, need / 1e9)
            return None
    except Exception as e:  # noqa: BLE001 - a missing or damaged model is reported by the engine
        log.debug("early read: skipped (%s: %s)", type(e).__name__, e)
        return None
    _active = EarlyReads(driver, files, threads)  # visible before the reads end: the loader waits per file
    return _active


def _largest_component(files: list[FileBuffer]) -> int:
    by_folder: dict[Path, int] = {}
    for f in files:
        by_folder[f.path.parent] = by_folder.get(f.path.parent, 0) + f.nbytes
    return max(by_folder.values(), default=0)


def _pread_exactly(fd: int, view: memoryview, offset: int, path) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise OSError(f"{path} ended at byte {offset + got}")
        got += n
