"""Merged LoRA: deltas folded into a network's weights in place, and undone exactly.

    W <- W + sum_k scale_k * (up_k @ down_k)        computed in fp32, rounded once to the weight's dtype

In place, wherever the weight lives (GPU, pinned host buffers of streamed blocks), so no placement changes and
captured graphs keep their addresses. The targets are module names of the unfused network (`layers.3.attention.to_k`);
after fusion (zimage.speed.fuse) they are row slices of `to_qkv` / `w13`, and under fp8 storage (zimage.speed.fp8)
the rows are dequantised, changed and re-quantised. Undoing is exact: the merged modules' weights are read again
from the checkpoint (the same bytes and the same cast as at load), never reconstructed by subtraction, so merge +
unmerge in bf16 gives back the loaded weights bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FUSED = {"to_q": ("to_qkv", 0, 3), "to_k": ("to_qkv", 1, 3), "to_v": ("to_qkv", 2, 3),
         "w1": ("w13", 0, 2), "w3": ("w13", 1, 2)}  # name -> (fused name, part, parts): zimage.speed.fuse's order


@dataclass(frozen=True)
class Target:
    """Where a logical linear's weight lives: `module` (Linear / FP8Linear, or the base of a LoraLinear) and the rows
    of its weight that are this linear's (all rows unless fused)."""

    module: nn.Module
    rows: slice


def find_module(model: nn.Module, name: str) -> tuple[nn.Module, int, int]:
    """(module, part, parts) computing linear `name` (unfused module name) in `model`: its own module (0, 1), or the
    fused `to_qkv` / `w13` whose output row block `part` of `parts` it is; KeyError if there is none."""
    try:
        return model.get_submodule(name), 0, 1
    except AttributeError:
        parent_name, _, leaf = name.rpartition(".")
        if leaf not in FUSED:
            raise KeyError(name) from None
        fused_name, part, parts = FUSED[leaf]
        try:
            return model.get_submodule(f"{parent_name}.{fused_name}"), part, parts
        except AttributeError:
            raise KeyError(name) from None


def find_linear(model: nn.Module, name: str) -> Target:
    """The weight of linear `name` (unfused module name) in `model`, fused or not; KeyError if there is none."""
    module, part, parts = find_module(model, name)
    n = module.out_features // parts
    return Target(_base(module), slice(part * n, (part + 1) * n))


def _base(module):
    return getattr(module, "base", module)  # zimage.models.lora.LoraLinear wraps the layer it adds to


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{unfused linear name: (out, in)} of every linear of `model` (what a LoRA file may target)."""
    out = {}
    for name, module in model.named_modules():
        if not hasattr(module, "in_features") or name.endswith(".base"):
            continue
        leaf = name.rpartition(".")[2]
        if leaf in ("to_qkv", "w13"):
            parent = name.rpartition(".")[0]
            parts = [k for k, (f, _, _) in FUSED.items() if f == leaf]
            for p in parts:
                out[f"{parent}.{p}"] = (module.out_features // len(parts), module.in_features)
        else:
            out[name] = (module.out_features, module.in_features)
    return out


@torch.no_grad()
def add_delta(target: Target, delta: torch.Tensor) -> None:
    """weight[rows] <- round(weight[rows] + delta) with delta (out, in) fp32; fp8 rows re-quantised."""
    module = target.module
    if hasattr(module, "set_rows"):  # zimage.speed.fp8.FP8Linear: dequantise, add, quantise again
        rows = target.rows
        module.set_rows(rows, module.weight[rows].float() * module.scale[rows] + delta.to(module.weight.device))
        return
    w = module.weight[target.rows]
    w.copy_((w.float() + delta.to(w.device)).to(w.dtype))


@torch.no_grad()
def set_weight(target: Target, weight: torch.Tensor) -> None:
    """weight[rows] <- `weight` (out, in) as loaded (compute dtype); fp8 rows quantised as at load."""
    module = target.module
    if hasattr(module, "set_rows"):  # zimage.speed.fp8.FP8Linear
        module.set_rows(target.rows, weight)
        return
    module.weight[target.rows] = weight.to(module.weight.device, module.weight.dtype)


def merge(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add {linear name: delta (out, in) fp32} to `model`'s weights (every name must be found first: nothing is
    changed when one is not)."""
    targets = {name: find_linear(model, name) for name in deltas}
    for name, delta in deltas.items():
        add_delta(targets[name], delta)


def restore(model: nn.Module, names, read_original) -> None:
    """Put back the loaded weights of linears `names`; `read_original(names) -> {name: weight (out, in)}` reads them
    from the checkpoint in the compute dtype (zimage.weights.load.read_weights)."""
    names = sorted(names)
    targets = {name: find_linear(model, name) for name in names}
    for name, weight in read_original(names).items():
        set_weight(targets[name], weight)
