"""The choice of attention kernel for the GPU at hand, and setting it on a transformer.

On Hopper and newer, cuDNN attention is ~1.8x flash SDPA at Z-Image's shapes (4096+ tokens, head dim 128) and,
compiled, the fastest measured (BENCHMARKS.md, forward variants); elsewhere PyTorch picks. The kernels themselves are called in
zimage.models.z_image.Attention.
"""

from __future__ import annotations

from zimage.models.z_image import CUDNN, NATIVE


def choose_attention_backend(device) -> str:
    """cuDNN SDPA on compute capability >= 9.0 (Hopper, Blackwell); PyTorch's own choice elsewhere."""
    import torch

    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        return CUDNN
    return NATIVE


def set_attention_backend(transformer, backend: str) -> None:
    """Use the SDPA kernel `backend` (zimage.models.z_image.ATTENTION_BACKENDS) in every block of `transformer`."""
    from zimage.models.z_image import ATTENTION_BACKENDS

    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    for block in transformer.blocks():
        block.attention.backend = backend


def attention_backend(transformer) -> str:
    """The backend the blocks of `transformer` use (they are set together)."""
    return transformer.blocks()[0].attention.backend
