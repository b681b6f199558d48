"""The CUDA driver's start-up (`cuInit` and the device's primary context, ~0.6 s on an H200 host) run while
`import torch` runs (~3-4 s), so that torch's own CUDA start-up later finds both made and only takes them.

ctypes releases the GIL for the foreign calls, so the import goes on meanwhile (measured: it is not slowed). The
primary context is the one the CUDA runtime, torch's, uses for that device. Linux only (libcuda.so.1). Any failure
is silent here: a missing driver or GPU is reported by torch, with zimage's message, when the device is resolved.

Reading the weights during the import as well (into GPU buffers through the driver API, taken by the engine with
device-to-device copies) was built and measured (commit 0c6b51a): the reads then end inside the import, but any
33 GB page-cache read beside it, even plain `pread` by Python threads with no CUDA, slows `import torch` by ~1 s,
as much as it hides; so the weights are read after the import (BENCHMARKS.md, cold start).
"""

from __future__ import annotations

import ctypes
import sys
import threading


def start_in_background(device: str) -> threading.Thread | None:
    """For `--device auto | cuda | cuda:N` on Linux: a daemon thread that initialises the driver and retains the
    device's primary context; None otherwise."""
    kind, _, index = device.partition(":")
    if not sys.platform.startswith("linux") or kind not in ("auto", "cuda") or (index and not index.isdigit()):
        return None
    thread = threading.Thread(target=_init, args=(int(index or 0),), name="zimage-cuda-driver-init", daemon=True)
    thread.start()
    return thread


def _init(ordinal: int) -> None:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver on this machine
        return
    device, context = ctypes.c_int(), ctypes.c_void_p()
    # Each returns a CUresult; at the first failure the rest is left to torch, which checks for itself.
    if lib.cuInit(ctypes.c_uint(0)) == 0 and lib.cuDeviceGet(ctypes.byref(device), ctypes.c_int(ordinal)) == 0:
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device)  # kept for the process's life, as torch's is
