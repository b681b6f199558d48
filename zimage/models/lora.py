"""Runtime (unmerged) LoRA: a linear layer plus per-row low-rank deltas, for switching LoRA sets per request and for
batches whose rows use different sets.

    y = base(x) + (x A_s^T) B_s^T        for row b of the batch, s = rows[b] its slot (no delta where s < 0)

Each wrapped layer holds `slots` factor pairs of one rank bucket R (a set of several LoRAs is one pair: their
factors concatenated along the rank, scales folded into B; lower ranks padded with zeros, which add exactly 0):
    lora_down (S, P*R, in), lora_up (S, out, R)  in the compute dtype, parameters (placement and streaming move them).
P is the number of logical linears the layer computes: 1, or 3 for a fused q/k/v and 2 for a fused w1/w3
(zimage.speed.fuse). Part p owns output rows [p*out/P, (p+1)*out/P) and down rows [p*R, (p+1)*R): one down GEMM
reads the input once for all parts, and each part's up product adds into its own columns of the output.
Which slot each row uses is shared by every layer of the network through one `LoraRows` object that the engine sets
before a forward. In eager mode a batch whose rows all use one slot takes two plain matmuls; otherwise (and always
when compiled, so that no Python branch depends on which slots a batch uses and a change of LoRA set never
recompiles) the rows' factors are gathered and multiplied batch-wise (bmm: the segmented LoRA matmul of multi-LoRA
LLM servers, at image batch sizes). The up product accumulates into the base layer's output in place (one GEMM with
beta = 1, `add_lora_delta_`): a separate `y + delta` would write the (B, L, out) delta and read it and y back, about
as many bytes per linear as the base GEMM's output itself. Bytes, not FLOPs, are what a slot costs: measured on an
H200 at 1024x1024 (compiled, fused), rank buckets 32 and 128 cost the same, 1.09-1.10x a plain image. Writing the
up product first and letting the base GEMM add onto it (addmm with beta = 1) was slower there (1.14x).

Compiled, a batch whose LoRA rows all use one slot (the common case: one set per batch, or none) takes a cheaper
form on layers whose base was widened (`LoraLinear.widen`, done by zimage.speed for the resident compiled plan):
the base weight W (out, in) is the left part of one matrix [W | E] (out, in + P*R), whose extension E holds that
slot's up factors block-diagonally (part p's rows, part p's R columns; zeros elsewhere), and
    y = [x | x A^T] [W | E]^T        one GEMM; the input padded by P*R columns (written by x's producer) whose
                                      values the thin down GEMM fills in place (`fill_lora_down_`)
so the delta accumulates in fp32 inside the base GEMM and the output is written once. Rows without LoRA get a
zero down factor, so they add exactly 0. Which slot E holds follows the batch (`LoraRows.set` copies the slot's up
factors in when it changed), never a recompile; a batch mixing slots takes the gathered path above (the graph
guards on `LoraRows.mixed`: two graphs per shape, both compiled by the engine's warm-up). Measured on an H200 at
1024x1024 (bf16, 4 slots): 1.075x a plain compiled image at rank bucket 128 and 1.055x at bucket 32, against
1.10x for the in-place add alone (per fused block: 1.07x against 1.12x at rank 32, benchmarks/experiments/
lora_kext_probe.py). Widened: q/k/v, w1/w3 and w2; the attention output keeps the in-place add (its input is the
attention kernel's output, which a pad would copy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.library.custom_op("zimage::add_lora_delta_", mutates_args=("y",))
def add_lora_delta_(y: Tensor, d: Tensor, up_t: Tensor) -> None:
    """y (B, L, out) += d (B, L, P*R) @ up_t (B, R, out) part by part: columns [p*n, (p+1)*n) of y (n = out / P) get
    d[..., p*R:(p+1)*R] @ up_t[..., p*n:(p+1)*n], in place (strided GEMMs on y's own buffer). A custom op so that a
    compiled graph keeps these in-place GEMMs on the base output (a plain `y.baddbmm_` is functionalised into a copy
    plus an out-of-place baddbmm)."""
    rank = up_t.shape[1]
    parts = d.shape[-1] // rank
    n = y.shape[-1] // parts
    for p in range(parts):
        y[..., p * n:(p + 1) * n].baddbmm_(d[..., p * rank:(p + 1) * rank], up_t[..., p * n:(p + 1) * n])


@add_lora_delta_.register_fake
def _(y: Tensor, d: Tensor, up_t: Tensor) -> None:
    return None


@torch.library.custom_op("zimage::fill_lora_down_", mutates_args=("xp",))
def fill_lora_down_(xp: Tensor, down_t: Tensor) -> None:
    """xp (B, L, in + K): columns [in, in + K) <- xp[..., :in] @ down_t (B, in, K), in place. A custom op so that
    a compiled graph writes the down product into the padded input's own tail instead of a copy of it."""
    n = xp.shape[-1] - down_t.shape[-1]
    xp[..., n:].baddbmm_(xp[..., :n], down_t, beta=0.0)


@fill_lora_down_.register_fake
def _(xp: Tensor, down_t: Tensor) -> None:
    return None


class WideLinear(nn.Module):
    """A bias-free linear (out, in) whose weight is the left part of one wider parameter `wide` (out, in + K): the
    runtime LoRA's one-GEMM form multiplies by all of it (LoraLinear). Everything else sees `weight`, a view, so
    in-place writes (a merged LoRA) land in `wide`, and moving `wide` (placement, streaming) moves the weight."""

    def __init__(self, linear: nn.Linear, extra: int):
        super().__init__()
        w = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        wide = torch.zeros(self.out_features, self.in_features + extra, dtype=w.dtype, device=w.device)
        wide[:, :self.in_features] = w.detach()
        self.wide = nn.Parameter(wide, requires_grad=False)

    @property
    def weight(self) -> Tensor:
        return self.wide[:, :self.in_features]  # (out, in), row stride in + K

    @property
    def ext(self) -> Tensor:
        return self.wide[:, self.in_features:]  # (out, K)

    def forward(self, x):
        return F.linear(x, self.weight)


class LoraRows:
    """The slot of each row of the batch about to run (shared by all LoraLinear layers of a network)."""

    def __init__(self):
        self.slots: tuple[int, ...] = ()  # per row; -1: no LoRA
        self.index: torch.Tensor | None = None  # (B,) long on the device: slots clamped to >= 0
        self.active: torch.Tensor | None = None  # (B, 1, 1) in the compute dtype: 0 for rows without LoRA
        self.mixed = False  # LoRA rows use more than one slot: widened layers take the gathered path
        self.force_mixed = False  # the gathered path for every batch (the engine's warm-up compiles it so)
        self.wide: list[LoraLinear] = []  # the layers with a widened base (LoraLinear.widen)

    def set(self, slots, device, dtype) -> None:
        """Rows about to run use `slots` (one per row, -1: none). The widened layers' extensions are brought to the
        one slot the LoRA rows share, if they share one: after a slot was rewritten too (LoraLinear.write)."""
        slots = tuple(int(s) for s in slots)
        if slots != self.slots or self.index is None or self.index.device != torch.device(device):
            self.slots = slots
            self.index = torch.tensor([max(s, 0) for s in slots], dtype=torch.long, device=device)
            self.active = torch.tensor([1.0 if s >= 0 else 0.0 for s in slots], dtype=dtype,
                                       device=device).view(-1, 1, 1)
        used = {s for s in slots if s >= 0}
        self.mixed = self.force_mixed or len(used) > 1
        if len(used) == 1 and not self.mixed:
            (slot,) = used
            for layer in self.wide:
                if layer.carried != slot:
                    layer.carry(slot)

    def uniform(self) -> int | None:
        """The one slot every row uses, or None when rows differ."""
        return self.slots[0] if self.slots and all(s == self.slots[0] for s in self.slots) else None


class LoraLinear(nn.Module):
    """`base` (an nn.Linear or FP8Linear, kept as is) plus `slots` LoRA factor pairs of rank `rank` for each of its
    `parts` equal row blocks."""

    def __init__(self, base: nn.Module, slots: int, rank: int, rows: LoraRows, dtype, device=None, parts: int = 1):
        super().__init__()
        if base.out_features % parts:
            raise ValueError(f"{base.out_features} output features do not split into {parts} equal parts")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.parts = parts
        self.rows = rows
        self.lora_down = nn.Parameter(torch.zeros(slots, parts * rank, self.in_features, dtype=dtype, device=device),
                                      requires_grad=False)
        self.lora_up = nn.Parameter(torch.zeros(slots, self.out_features, rank, dtype=dtype, device=device),
                                    requires_grad=False)
        self.carried: int | None = None  # the slot whose up factors a widened base's extension holds

    @classmethod
    def fused(cls, base: nn.Module, layers: list[LoraLinear]) -> LoraLinear:
        """One layer over `base` (the layers' base weights concatenated along the output, zimage.speed.fuse) that
        computes what `layers` (single-part, same slots, rank and rows) computed, part p being layers[p]."""
        if not cls.fusable(layers):
            raise ValueError("only single-part LoRA layers of one slot count, rank and row map fuse")
        first = layers[0]
        down = first.lora_down
        fused = cls(base, down.shape[0], first.rank, first.rows, down.dtype, device=down.device, parts=len(layers))
        with torch.no_grad():
            fused.lora_down.copy_(torch.cat([m.lora_down for m in layers], dim=1))  # (S, P*R, in)
            fused.lora_up.copy_(torch.cat([m.lora_up for m in layers], dim=1))  # (S, out, R)
        return fused

    @staticmethod
    def fusable(layers) -> bool:
        """Whether `layers` can become one layer of parts: all single-part LoraLinears of one slot count, rank and
        row map."""
        first = layers[0]
        return all(type(m) is LoraLinear and m.parts == 1 and m.rows is first.rows
                   and m.lora_up.shape[::2] == first.lora_up.shape[::2] for m in layers)

    @property
    def weight(self):
        """The wrapped layer's weight (code that reads a linear's dtype or shape sees the base layer's)."""
        return self.base.weight

    @property
    def slots(self) -> int:
        return self.lora_down.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_up.shape[2]

    def widen(self) -> bool:
        """Make room beside the base weight for one slot's up factors (WideLinear), for the one-GEMM form of a
        compiled batch whose LoRA rows share a slot; True if the base is (now) widened. Only a bias-free nn.Linear
        base widens (not fp8 layers: their weights are scaled per row). Idempotent. Costs out * P*R elements."""
        if isinstance(self.base, WideLinear):
            return True
        if type(self.base) is not nn.Linear or self.base.bias is not None:
            return False
        self.base = WideLinear(self.base, self.parts * self.rank)
        self.carried = None
        self.rows.wide.append(self)
        return True

    @torch.no_grad()
    def carry(self, slot: int) -> None:
        """The widened base's extension (out, P*R) <- slot `slot`'s up factors, part p's (out/P, R) block at rows
        [p*out/P, (p+1)*out/P) and columns [p*R, (p+1)*R); the blocks off the diagonal stay zero."""
        ext, rank, n = self.base.ext, self.rank, self.out_features // self.parts
        for p in range(self.parts):
            ext[p * n:(p + 1) * n, p * rank:(p + 1) * rank].copy_(self.lora_up[slot, p * n:(p + 1) * n])
        self.carried = slot

    @torch.no_grad()
    def write(self, slot: int, down: torch.Tensor | None, up: torch.Tensor | None, part: int = 0) -> None:
        """Slot `slot` of part `part` <- down (r, in), up (out / parts, r) with r <= rank (scale already in `up`);
        None clears it. A widened base's extension is refreshed at the next LoraRows.set."""
        if slot == self.carried:
            self.carried = None
        rank, n = self.rank, self.out_features // self.parts
        down_rows = self.lora_down[slot, part * rank:(part + 1) * rank]  # (R, in)
        up_rows = self.lora_up[slot, part * n:(part + 1) * n]  # (n, R)
        down_rows.zero_()
        up_rows.zero_()
        if down is None:
            return
        r = down.shape[0]
        down_rows[:r].copy_(down)
        up_rows[:, :r].copy_(up)

    def forward(self, x):
        """x (B, ..., in) -> (B, ..., out); row b of the batch gets slot rows.slots[b]'s delta."""
        compiling = torch.compiler.is_compiling()
        if compiling and isinstance(self.base, WideLinear) and not self.rows.mixed:  # one slot for the LoRA rows
            return self._one_gemm(x)
        y = self.base(x).contiguous()  # a no-op for a linear's fresh output; the deltas are added into it in place
        lead = x.shape
        if not compiling:
            slot = self.rows.uniform()
            if slot is not None:
                if slot < 0:
                    return y
                d = torch.nn.functional.linear(x, self.lora_down[slot])  # (B, ..., P*R)
                add_lora_delta_(y.view(1, -1, self.out_features), d.view(1, -1, d.shape[-1]),
                                self.lora_up[slot].t().unsqueeze(0))
                return y
        rows = self.rows
        x3 = x.reshape(lead[0], -1, lead[-1])  # (B, L, in): one sequence per row
        down = self.lora_down[rows.index]  # (B, P*R, in)
        up = self.lora_up[rows.index] * rows.active  # (B, out, R); rows without LoRA add 0
        d = torch.bmm(x3, down.transpose(1, 2))  # (B, L, P*R)
        add_lora_delta_(y.view(lead[0], -1, self.out_features), d, up.transpose(1, 2))
        return y

    def _one_gemm(self, x):
        """[x | x A^T] [W | E]^T for a batch whose LoRA rows use the slot E holds (LoraRows.set keeps it so)."""
        rows, wide = self.rows, self.base.wide  # (out, in + K), K = P*R
        lead, k = x.shape, wide.shape[1] - self.in_features
        xp = F.pad(x, (0, k)).reshape(lead[0], -1, self.in_features + k)  # (B, L, in + K)
        down = self.lora_down[rows.index] * rows.active  # (B, K, in): zero for rows without LoRA
        fill_lora_down_(xp, down.transpose(1, 2))
        return F.linear(xp, wide).reshape(*lead[:-1], self.out_features)


def wrap_linears(model: nn.Module, names, slots: int, rank: int, dtype) -> tuple[LoraRows, dict]:
    """Replace each linear `names[i]` of `model` by a LoraLinear around it (on the linear's device), all sharing one
    LoraRows; returns (rows, {name: LoraLinear}). Slots start empty (zero: the output is unchanged)."""
    rows = LoraRows()
    rows.set([-1], next(model.parameters()).device, dtype)
    layers = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = parent._modules[attr]
        layer = LoraLinear(base, slots, rank, rows, dtype, device=base.weight.device)
        parent._modules[attr] = layer
        layers[name] = layer
    return rows, layers
