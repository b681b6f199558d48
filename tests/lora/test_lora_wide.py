"""Runtime LoRA layers in their one-GEMM form (zimage.models.lora.LoraLinear.widen, zimage.speed.lora_wide): the
same outputs as the slots' gathered path, extensions that follow slot switches and rewrites, merges that land in
the widened weight, and the planner's count of the extra bytes. CPU, fp32."""

from __future__ import annotations

import pytest
import torch
from test_lora_layers import fuse, rewrite, three_layers

from zimage.models.lora import LoraLinear, WideLinear


def reference(layers, x):
    """What the three unfused, unwidened layers give (eager: the uniform fast path or the gathered one)."""
    return torch.cat([lora(x) for lora in layers], dim=-1)


def widened(slots=3):
    rows, layers = three_layers(slots)
    fused = fuse(layers)
    assert fused.widen() and isinstance(fused.base, WideLinear)
    assert fused.base.wide.shape == (120, 24 + 3 * 8) and fused.weight.shape == (120, 24)
    return rows, layers, fused


@pytest.mark.parametrize("slots", [[1, 1], [2, -1, 2], [-1, -1], [2, -1, 0]],
                         ids=["one set", "one set and no LoRA", "none", "mixed"])
def test_the_one_gemm_form_computes_what_the_slots_do(monkeypatch, slots):
    """As compiled (the form runs only under torch.compile): one set, one set beside rows without LoRA, no LoRA
    (one GEMM each), and a mixed batch (the gathered path over the widened weight)."""
    rows, layers, fused = widened()
    x = torch.randn(len(slots), 6, 24)
    rows.set(slots, "cpu", torch.float32)
    want = reference(layers, x)
    calls = []
    monkeypatch.setattr(fused, "_one_gemm", lambda x, real=fused._one_gemm: calls.append(1) or real(x))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(fused(x), want, rtol=0, atol=1e-5)
    assert bool(calls) == (slots != [2, -1, 0]) and rows.mixed == (slots == [2, -1, 0])


def test_the_extension_follows_a_slot_switch_and_a_rewritten_slot(monkeypatch):
    """LoraRows.set copies the batch's slot into the extension, also when the slot numbers are the same as the last
    batch's but the slot was rewritten with another set (a server reusing its least recently used slot)."""
    rows, layers, fused = widened()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(1, 5, 24)
    for slots, slot in (([0], None), ([1], None), ([1], 1), ([1], None), ([0], 0)):
        if slot is not None:
            rewrite(fused, layers, slot, part=2, seed=70 + slot)
        rows.set(slots, "cpu", torch.float32)
        assert fused.carried == slots[0]
        torch.testing.assert_close(fused(x), reference(layers, x), rtol=0, atol=1e-5)


def test_a_compiled_widened_layer_has_one_graph_per_path_and_never_recompiles_for_new_contents():
    """Under torch.compile (inductor, CPU): batches of one set, of none, with a slot switched or rewritten all
    reuse one graph; a batch mixing sets adds the second (the graph guards on LoraRows.mixed), and both are reused
    after. Outputs equal the unwidened layers'."""
    from torch._dynamo.testing import CompileCounterWithBackend

    rows, layers, fused = widened()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(fused, backend=counter, dynamic=False)
    x = torch.randn(2, 5, 24)
    runs = (([1, -1], None, 1), ([0, 0], None, 1), ([0, 0], (0, 1), 1), ([-1, -1], None, 1), ([2, 0], None, 2),
            ([2, 2], (2, 0), 2), ([0, 1], None, 2))
    for slots, change, graphs in runs:
        if change is not None:
            rewrite(fused, layers, *change, seed=90 + change[0])
        rows.set(slots, "cpu", torch.float32)
        torch.testing.assert_close(compiled(x), reference(layers, x), rtol=0, atol=1e-5)
        assert counter.frame_count == graphs, slots


def test_a_merge_into_a_widened_weight_lands_in_it():
    """zimage.weights.lora.merge writes the weight's rows in place: through the view, into `wide`, which is what
    the one-GEMM form multiplies by."""
    from zimage.weights.lora import merge

    rows, layers, fused = widened()
    model = torch.nn.Module()
    model.attention = torch.nn.Module()
    model.attention.to_qkv = fused
    delta = torch.randn(40, 24)
    before = fused.base.wide[40:80, :24].clone()
    merge.merge(model, {"attention.to_k": delta})
    torch.testing.assert_close(fused.base.wide[40:80, :24], before + delta, rtol=0, atol=1e-6)
    assert [n for n, _ in fused.base.named_parameters()] == ["wide"]  # one tensor to place and stream


def test_only_bias_free_plain_linears_widen():
    from zimage.models.lora import LoraRows

    with_bias = LoraLinear(torch.nn.Linear(24, 40, bias=True), 2, 4, LoraRows(), torch.float32)
    assert not with_bias.widen() and type(with_bias.base) is torch.nn.Linear
    rows, layers, fused = widened()
    assert fused.widen() and rows.wide == [fused]  # idempotent: registered once


def test_the_planner_counts_the_bytes_widening_allocates(tiny_folder):
    """slot_bytes(widened=True) is the slots' bytes plus what widen_lora_layers adds to the parameters."""
    from zimage.engine.loras import runtime_targets, slot_bytes
    from zimage.models.lora import wrap_linears
    from zimage.speed.fuse import fuse_block
    from zimage.speed.lora_wide import widen_lora_layers
    from zimage.weights.networks import build_transformer

    transformer = build_transformer(tiny_folder).module.to_empty(device="cpu")
    plain = sum(p.numel() * p.element_size() for p in transformer.parameters())
    wrap_linears(transformer, runtime_targets(transformer), 3, 8, torch.float32)
    for block in transformer.blocks():
        fuse_block(block)
    slotted = sum(p.numel() * p.element_size() for p in transformer.parameters())
    assert widen_lora_layers(transformer) == 3 * len(transformer.blocks())
    wide = sum(p.numel() * p.element_size() for p in transformer.parameters())
    meta = build_transformer(tiny_folder).module
    for widened, want in ((False, slotted - plain), (True, wide - plain)):
        blocks, rest = slot_bytes(meta, 3, 8, 4, widened=widened)
        assert sum(blocks.values()) + rest == want, widened
