"""The CUDA driver's initialisation (`cuInit`, ~0.2 s on an H200 host) started while `import torch` runs (~3 s).

torch's own CUDA start-up later finds the driver initialised and only creates its context. ctypes releases the GIL
for the foreign call, so the import goes on meanwhile. Linux only (libcuda.so.1); any failure is silent here: a
missing driver or GPU is reported by torch, with zimage's message, when the device is resolved.
"""

from __future__ import annotations

import sys
import threading


def start_in_background(device: str) -> threading.Thread | None:
    """For `--device auto | cuda | cuda:N` on Linux: a daemon thread calling cuInit(0); None otherwise."""
    if not sys.platform.startswith("linux") or device.partition(":")[0] not in ("auto", "cuda"):
        return None
    thread = threading.Thread(target=_init, name="zimage-cuda-driver-init", daemon=True)
    thread.start()
    return thread


def _init() -> None:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1").cuInit(0)  # returns a CUresult; torch checks for itself later
    except OSError:  # no NVIDIA driver on this machine
        pass
