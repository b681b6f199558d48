"""Merged LoRA in place (zimage.weights.lora.merge): unfused, fused and fp8-stored weights get W + delta, and the
restore from the checkpoint gives back the loaded weights bit for bit (also in bf16)."""

from __future__ import annotations

import pytest
import torch

from zimage.weights.lora import merge as lora_merge

NAMES = ["layers.0.attention.to_k", "layers.1.feed_forward.w3", "noise_refiner.0.adaLN_modulation.0",
         "context_refiner.0.attention.to_out.0"]


@pytest.fixture
def loaded(tiny_folder):
    from zimage.weights.check import check_model_folder
    from zimage.weights.load import load_network

    def load(dtype):
        checked = check_model_folder(tiny_folder)["transformer"]
        return load_network(checked, "cpu", dtype), checked

    return load


def deltas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = lora_merge.linear_shapes(model)
    return {n: torch.randn(*shapes[n], generator=g) * 0.01 for n in NAMES}


def weight_of(model, name):
    t = lora_merge.find_linear(model, name)
    w = t.module.weight
    if w.dtype == torch.float8_e4m3fn:
        return (w.float() * t.module.scale)[t.rows]
    return w[t.rows].float()


@pytest.mark.parametrize("layout", ["plain", "fused", "fp8"])
def test_merge_adds_the_delta_wherever_the_weight_lives(loaded, layout):
    model, _ = loaded(torch.float32)
    if layout == "fused":
        from zimage.speed.fuse import fuse_block

        for block in model.blocks():
            fuse_block(block)
        assert not hasattr(model.layers[0].attention, "to_k")
    if layout == "fp8":
        from zimage.speed.fp8 import quantize_transformer

        quantize_transformer(model)
    before = {n: weight_of(model, n).clone() for n in NAMES}
    d = deltas(model)
    lora_merge.merge(model, d)
    tol = 0.05 if layout == "fp8" else 1e-6  # fp8 rows are re-quantised: one fp8 rounding of the sum
    for n in NAMES:
        torch.testing.assert_close(weight_of(model, n), before[n] + d[n], rtol=0, atol=tol * before[n].abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
def test_merge_then_restore_gives_back_the_loaded_weights_exactly(loaded, dtype, fused):
    from zimage.weights.load import read_original

    model, checked = loaded(dtype)
    if fused:
        from zimage.speed.fuse import fuse_block

        for block in model.blocks():
            fuse_block(block)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora_merge.merge(model, deltas(model))
    assert any(not torch.equal(original[k], v) for k, v in model.state_dict().items())  # the merge changed weights

    def read(names):
        got = read_original(checked, [f"{n}.weight" for n in names], dtype)
        return {n: got[f"{n}.weight"] for n in names}

    lora_merge.restore(model, NAMES, read)
    for k, v in model.state_dict().items():
        assert torch.equal(original[k], v), k


def test_an_unknown_target_changes_nothing(loaded):
    model, _ = loaded(torch.float32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    d = deltas(model)
    d["layers.0.attention.to_z"] = torch.zeros(64, 64)
    with pytest.raises(KeyError, match="to_z"):
        lora_merge.merge(model, d)
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_linear_shapes_lists_fused_parts_by_their_own_names(loaded):
    from zimage.speed.fuse import fuse_block

    model, _ = loaded(torch.float32)
    plain = lora_merge.linear_shapes(model)
    for block in model.blocks():
        fuse_block(block)
    assert lora_merge.linear_shapes(model) == plain
    assert plain["layers.0.attention.to_q"] == (64, 64) and plain["layers.0.feed_forward.w1"] == (170, 64)
