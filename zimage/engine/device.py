"""Choosing the device and the dtype, with clear errors for what is not there."""

from __future__ import annotations

from zimage.engine.config import DEVICE_CHOICES, DTYPE_CHOICES
from zimage.errors import DeviceError, UsageError


def resolve_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in DEVICE_CHOICES[1:] or (index and not index.isdigit()) or (index and kind != "cuda"):
        raise UsageError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)} or cuda:N", param="device")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise DeviceError(f"--device {name}: no CUDA GPU is visible to this torch {torch.__version__} ({build})")
        i = int(index) if index else torch.cuda.current_device()
        if i >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", i)
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("--device mps: Apple's Metal backend is not available on this machine")
    return torch.device(kind)


def resolve_dtype(name: str, device):
    """bf16 where the GPU supports it, fp16 on older GPUs (with the fp16 guard), fp32 on CPU."""
    import torch

    table = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in table:
        raise UsageError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_CHOICES)}", param="dtype")
    dtype = table[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeviceError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or auto")
    return dtype


def dtype_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
