"""The choice of attention kernel for the GPU at hand.

On Hopper and newer, cuDNN attention is ~1.8x flash SDPA at Z-Image's shapes (DESIGN.md) and, compiled, the fastest
measured (BENCHMARKS.md, forward variants); elsewhere PyTorch picks. The kernels themselves are called in
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
