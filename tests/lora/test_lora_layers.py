"""Runtime LoRA layers (zimage.models.lora) and in-place merging (zimage.weights.lora.merge), on CPU in fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zimage.models.lora import LoraLinear, LoraRows


def factors(out_f, in_f, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)  # down (r, in), up (out, r)


def layer(slots=3, rank=8, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(24, 40, bias=True)
    rows = LoraRows()
    lora = LoraLinear(base, slots, rank, rows, torch.float32)
    return base, rows, lora


def test_uniform_slot_adds_its_delta_and_lower_ranks_pad_with_zeros():
    base, rows, lora = layer()
    down, up = factors(40, 24, 5, 1)  # rank 5 in a bucket of 8
    lora.write(1, down, up)
    x = torch.randn(2, 7, 24)
    rows.set([1, 1], "cpu", torch.float32)
    torch.testing.assert_close(lora(x), base(x) + x @ down.T @ up.T, rtol=0, atol=1e-5)
    rows.set([-1, -1], "cpu", torch.float32)
    assert torch.equal(lora(x), base(x))  # no LoRA: the base layer's output, exactly


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "gather path (as compiled)"])
def test_mixed_rows_each_get_their_own_slot(monkeypatch, compiling):
    base, rows, lora = layer()
    ds = [factors(40, 24, 8, s) for s in (1, 2)]
    for slot, (down, up) in enumerate(ds):
        lora.write(slot, down, up)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    x = torch.randn(3, 5, 24)
    rows.set([1, -1, 0], "cpu", torch.float32)
    want = torch.stack([base(x[0]) + x[0] @ ds[1][0].T @ ds[1][1].T, base(x[1]),
                        base(x[2]) + x[2] @ ds[0][0].T @ ds[0][1].T])
    torch.testing.assert_close(lora(x), want, rtol=0, atol=1e-5)
    y2 = torch.randn(3, 24)  # 2-D inputs (adaLN modulation: (B, 256)) too
    torch.testing.assert_close(lora(y2)[1], base(y2[1]), rtol=0, atol=1e-6)


def test_write_none_clears_a_slot():
    base, rows, lora = layer()
    lora.write(2, *factors(40, 24, 8, 3))
    lora.write(2, None, None)
    rows.set([2], "cpu", torch.float32)
    x = torch.randn(1, 4, 24)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)


def test_compiled_layer_adds_deltas_in_place_and_never_recompiles_for_new_contents():
    """Under torch.compile (inductor, CPU) the gather path and its in-place delta op give the same outputs as
    eager; new slot contents or a new choice of rows reuse the one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    base, rows, lora = layer()
    for slot in range(3):
        lora.write(slot, *factors(40, 24, 8, 10 + slot))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lora, backend=counter)
    x = torch.randn(3, 5, 24)
    for slots, rewrite in (([1, -1, 0], None), ([2, 2, 0], 2), ([-1, 0, 1], 0)):
        if rewrite is not None:
            lora.write(rewrite, *factors(40, 24, 6, 20 + rewrite))  # a new set of lower rank in the slot
        rows.set(slots, "cpu", torch.float32)
        want = torch.stack([base(x[b]) + (x[b] @ lora.lora_down[s].T @ lora.lora_up[s].T if s >= 0 else 0)
                            for b, s in enumerate(slots)])
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=1e-5)
    assert counter.frame_count == 1


def three_layers(slots=3, rank=8, seed=0):
    """q, k, v-like LoRA layers (24 -> 40 each, no bias) sharing one row map, with different sets in their slots."""
    torch.manual_seed(seed)
    rows = LoraRows()
    layers = [LoraLinear(nn.Linear(24, 40, bias=False), slots, rank, rows, torch.float32) for _ in range(3)]
    for p, lora in enumerate(layers):
        for slot in range(slots):
            if (p, slot) != (1, 2):  # part 1 of slot 2 left empty: a set that does not touch k
                lora.write(slot, *factors(40, 24, 8 - slot, 100 * p + slot))
    return rows, layers


def rewrite(fused, layers, slot, part, seed):
    """Slot `slot` of part `part` <- a new rank-6 set, in the fused layer and in its unfused reference alike."""
    down, up = factors(40, 24, 6, seed)
    fused.write(slot, down, up, part=part)
    layers[part].write(slot, down, up)


def fuse(layers):
    from zimage.speed.fuse import _fused_linear

    return _fused_linear(layers)


@pytest.mark.parametrize("compiling", [False, True], ids=["eager", "gather path (as compiled)"])
@pytest.mark.parametrize("slots", [[1, 1], [2, -1, 0], [-1]], ids=["uniform", "mixed", "none"])
def test_a_fused_lora_layer_computes_its_parts(monkeypatch, compiling, slots):
    """q/k/v fused into one layer of 3 parts: each part's output block is what its own layer gave, for one slot,
    mixed rows and no LoRA, in the eager and the compiled code path."""
    rows, layers = three_layers()
    fused = fuse(layers)
    assert fused.parts == 3 and fused.lora_down.shape == (3, 24, 24) and fused.lora_up.shape == (3, 120, 8)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    x = torch.randn(len(slots), 6, 24)
    rows.set(slots, "cpu", torch.float32)
    want = torch.cat([lora(x) for lora in layers], dim=-1)
    torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-5)


def test_writing_a_part_of_a_fused_layer_changes_only_that_part():
    rows, layers = three_layers()
    fused = fuse(layers)
    down, up = factors(40, 24, 5, 7)
    fused.write(0, down, up, part=1)  # k's factors of slot 0 replaced (rank 5 in the bucket of 8)
    layers[1].write(0, down, up)
    rows.set([0], "cpu", torch.float32)
    x = torch.randn(1, 4, 24)
    torch.testing.assert_close(fused(x), torch.cat([lora(x) for lora in layers], dim=-1), rtol=0, atol=1e-5)
    fused.write(0, None, None, part=2)  # v's slot 0 cleared: that block is v's base output
    torch.testing.assert_close(fused(x)[..., 80:], layers[2].base(x), rtol=0, atol=1e-6)


def test_layers_of_different_ranks_or_row_maps_do_not_fuse():
    rows, layers = three_layers()
    other = LoraLinear(nn.Linear(24, 40, bias=False), 3, 4, rows, torch.float32)
    with pytest.raises(ValueError, match="fuse"):
        LoraLinear.fused(nn.Linear(24, 80, bias=False), [layers[0], other])
    stranger = LoraLinear(nn.Linear(24, 40, bias=False), 3, 8, LoraRows(), torch.float32)
    with pytest.raises(ValueError, match="fuse"):
        LoraLinear.fused(nn.Linear(24, 80, bias=False), [layers[0], stranger])


def test_a_compiled_fused_layer_never_recompiles_for_new_contents():
    from torch._dynamo.testing import CompileCounterWithBackend

    rows, layers = three_layers()
    fused = fuse(layers)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fused, backend=counter)
    x = torch.randn(2, 5, 24)
    for slots, change in (([1, -1], None), ([2, 0], (2, 1)), ([0, 0], (0, 2))):
        if change is not None:
            rewrite(fused, layers, *change, seed=50 + change[0])
        rows.set(slots, "cpu", torch.float32)
        torch.testing.assert_close(compiled(x), torch.cat([lora(x) for lora in layers], dim=-1), rtol=0, atol=1e-5)
    assert counter.frame_count == 1
