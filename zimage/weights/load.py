"""Loading checked networks: safetensors read straight to the target device, cast there, assigned into the
meta-built module (no random init, no second copy in host memory)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from zimage.weights.check import CheckedNetwork


def load_network(checked: CheckedNetwork, device, dtype, progress=None):
    """Materialise `checked.network.module` on `device` in `dtype`. `progress(nbytes)` is called per tensor.

    Returns the module in eval mode with gradients off.
    """
    import torch
    from safetensors import safe_open

    module = checked.network.module
    by_file: dict[Path, list[tuple[str, str]]] = defaultdict(list)  # file -> [(stored name, module name)]
    for target, (stored, info) in checked.tensors.items():
        by_file[info.file].append((stored, target))
    state: dict[str, torch.Tensor] = {}
    read_device = str(device) if torch.device(device).type in ("cuda", "cpu") else "cpu"
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device=read_device) as f:
            for stored, target in names:
                t = f.get_tensor(stored)
                if t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                state[target] = t.to(device)
                if progress is not None:
                    progress(t.numel() * t.element_size())
    module.load_state_dict(state, strict=True, assign=True)
    _materialize_buffers(module, device)
    module.requires_grad_(False)
    module.eval()
    return module


def _materialize_buffers(module, device) -> None:
    """Non-persistent buffers (e.g. Qwen3's rotary inv_freq) are not in checkpoints; rebuild them on `device`."""
    import torch

    for name, sub in module.named_modules():
        if any(b.is_meta for b in sub.buffers(recurse=False)):
            if type(sub).__name__.endswith("RotaryEmbedding") and hasattr(sub, "config"):
                parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
                setattr(parent, name.rpartition(".")[2], type(sub)(config=sub.config).to(device))
            else:
                raise RuntimeError(f"buffer of {name} ({type(sub).__name__}) was not loaded and cannot be rebuilt")
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:5]}")
