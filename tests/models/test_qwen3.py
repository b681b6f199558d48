"""zimage.models.qwen3.Qwen3TextEncoder against transformers' Qwen3Model (the reference it re-implements).

The reference is a Qwen3Model with the tiny shapes of zimage/weights/tiny.py (GQA: 2 query heads, 1 kv head) and
its weights randomised (the norm weights are 1 at init, which would hide a missing or swapped norm); its state dict,
minus the final norm and the dropped last layer, is loaded into a meta-constructed Qwen3TextEncoder with
strict=True, assign=True, as the runtime loads it. The encoder must equal hidden_states[num_layers] on real tokens.
bf16: the reference is cast to bf16 with its rotary inv_freq rebuilt in fp32, as zimage's loader leaves it
(zimage.weights.load._materialize_buffers).
Measured on CPU (torch 2.13, transformers 5.23), 20 seeds x (attention bias or not), activations up to ~10: fp32
and bf16 both differ from transformers by exactly 0.0 on real tokens (same ops in the same order). The
tolerances below leave margin for kernel changes; see each.
"""

from __future__ import annotations

import json

import pytest
import torch

from zimage.models.qwen3 import Qwen3TextEncoder
from zimage.weights.tiny import TINY_TEXT

VOCAB = 97
FP32_ATOL = 1e-5  # against transformers; measured 0.0 (20 seeds, with and without attention bias)
# bf16 against transformers: measured 0.0 (same 40 cases). Allowed: 1 bf16 ulp at the activations' magnitude
# (up to ~10 here: ulp 0.0625 in [8, 16)), the difference a kernel change makes (the same prompt alone vs padded
# in a batch differs by up to exactly that in bf16). An op-order slip is larger: rounding after the RMSNorm weight
# instead of before gives 0.18, rope cos/sin computed in bf16 gives 0.125 (measured by mutating this module).
BF16_ATOL = 0.0625
# The same prompt alone vs padded in a batch, fp32: other matmul shapes round differently (measured up to
# 6.4e-6 over 20 seeds at magnitudes up to ~10); allowed 1e-4.
BATCH_ATOL = 1e-4


def _reference(seed: int = 0, **overrides):
    """(transformers Qwen3Model fp32 eval with randomised weights, its config.json dict)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    shape = dict(TINY_TEXT, vocab_size=VOCAB)
    shape.update(overrides)
    model = Qwen3Model(Qwen3Config(**shape, rope_theta=1e6, rms_norm_eps=1e-6)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))  # larger than the init's 0.02: activations of order 1-10
    return model, json.loads(model.config.to_json_string())  # what text_encoder/config.json holds


def _encoder(model, config: dict, num_layers: int) -> Qwen3TextEncoder:
    """A meta-built encoder with the reference's weights for layers 0..num_layers-1, loaded strictly."""
    with torch.device("meta"):
        enc = Qwen3TextEncoder(config, num_layers)
    dropped = tuple(f"layers.{i}." for i in range(num_layers, config["num_hidden_layers"])) + ("norm.",)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(dropped)}
    enc.load_state_dict(state, strict=True, assign=True)
    return enc.eval()


def _batch(lengths=(11, 6), seed: int = 1):
    """Right-padded ids (B, L_max) and mask (B, L_max) long, the pad id 0 in the padding."""
    g = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.zeros(len(lengths), longest, dtype=torch.long)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def _reference_hidden(model, ids, mask, num_layers):
    with torch.no_grad():
        return model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[num_layers]


def _max_diff_on_real(a, b, mask) -> float:
    real = mask.bool()
    return (a.float() - b.float())[real].abs().max().item()


@pytest.mark.parametrize("num_layers", [TINY_TEXT["num_hidden_layers"] - 1, 1])
def test_fp32_matches_transformers_on_padded_batch(num_layers):
    model, config = _reference()
    enc = _encoder(model, config, num_layers)
    ids, mask = _batch((11, 6))
    ref = _reference_hidden(model, ids, mask, num_layers)
    with torch.no_grad():
        out = enc(ids, mask)
        out_bool = enc(ids, mask.bool())
    assert out.shape == ref.shape == (2, 11, TINY_TEXT["hidden_size"])
    assert out.dtype == torch.float32
    assert _max_diff_on_real(out, ref, mask) <= FP32_ATOL
    assert torch.equal(out, out_bool)  # int and bool masks are the same mask
    assert torch.isfinite(out).all()  # padded positions too (each sees itself at least)
    assert ref[mask.bool()].abs().max() > 1  # the comparison is not between near-zero tensors


def test_fp32_padding_does_not_change_real_tokens():
    """The same prompt alone and padded in a batch: identical real-token outputs (causal + key mask)."""
    model, config = _reference()
    enc = _encoder(model, config, TINY_TEXT["num_hidden_layers"] - 1)
    ids, mask = _batch((11, 6))
    with torch.no_grad():
        batched = enc(ids, mask)
        alone = enc(ids[1:, :6], mask[1:, :6])  # unpadded: SDPA's is_causal path
        alone_no_mask = enc(ids[1:, :6])
    assert (batched[1, :6] - alone[0]).abs().max().item() <= BATCH_ATOL
    assert torch.equal(alone, alone_no_mask)


def test_fp32_unpadded_matches_transformers():
    model, config = _reference(seed=3)
    n = TINY_TEXT["num_hidden_layers"] - 1
    enc = _encoder(model, config, n)
    ids, mask = _batch((9, 9), seed=4)
    ref = _reference_hidden(model, ids, mask, n)
    with torch.no_grad():
        out = enc(ids, mask)
    assert _max_diff_on_real(out, ref, mask) <= FP32_ATOL


def test_attention_bias_and_transformers4_config():
    """attention_bias=True (biases loaded and used) and a config.json in transformers 4's form (rope_theta at the
    top level, rope_scaling null) give the same as the reference."""
    model, config = _reference(seed=5, attention_bias=True)
    config = {k: v for k, v in config.items() if k != "rope_parameters"}
    config.update(rope_theta=1e6, rope_scaling=None)
    n = TINY_TEXT["num_hidden_layers"] - 1
    enc = _encoder(model, config, n)
    assert "layers.0.self_attn.q_proj.bias" in enc.state_dict()
    ids, mask = _batch((7, 12), seed=6)
    ref = _reference_hidden(model, ids, mask, n)
    with torch.no_grad():
        out = enc(ids, mask)
    assert _max_diff_on_real(out, ref, mask) <= FP32_ATOL


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_bf16_matches_transformers(seed):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    model, config = _reference(seed=seed)
    n = TINY_TEXT["num_hidden_layers"] - 1
    enc = _encoder(model, config, n).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    model.rotary_emb = Qwen3RotaryEmbedding(config=model.config)  # fp32 inv_freq, as zimage's loader rebuilds it
    ids, mask = _batch((13, 5), seed=seed + 1)
    ref = _reference_hidden(model, ids, mask, n)
    with torch.no_grad():
        out = enc(ids, mask)
    assert out.dtype == torch.bfloat16
    assert _max_diff_on_real(out, ref, mask) <= BF16_ATOL
    assert 4 < ref[mask.bool()].float().abs().max() < 16  # the scale BF16_ATOL is 1 ulp of


def test_state_dict_keys_are_transformers_minus_dropped():
    for bias in (False, True):
        model, config = _reference(attention_bias=bias)
        n = TINY_TEXT["num_hidden_layers"] - 1
        with torch.device("meta"):
            enc = Qwen3TextEncoder(config, n)
        last = f"layers.{n}."
        expected = {k for k in model.state_dict() if not k.startswith(last) and not k.startswith("norm.")}
        assert set(enc.state_dict()) == expected
        for k, v in enc.state_dict().items():
            assert v.shape == model.state_dict()[k].shape, k


def test_meta_construction_has_no_buffers():
    _, config = _reference()
    with torch.device("meta"):
        enc = Qwen3TextEncoder(config, 2)
    assert list(enc.buffers()) == []
    assert all(p.is_meta for p in enc.parameters())
    assert len(enc.layers) == 2


@pytest.mark.parametrize(
    "change, word",
    [
        (dict(hidden_act="gelu"), "gelu"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "yarn"),
        (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
        (dict(use_sliding_window=True), "sliding"),
    ],
)
def test_unsupported_config_raises(change, word):
    _, config = _reference()
    config.update(change)
    with pytest.raises(ValueError, match=word):
        Qwen3TextEncoder(config, 1)


def test_rope_base_from_either_config_form():
    _, config = _reference()
    base = {k: v for k, v in config.items() if k not in ("rope_parameters", "rope_theta", "rope_scaling")}
    with torch.device("meta"):
        v5 = dict(base, rope_parameters={"rope_theta": 5e6, "rope_type": "default"})
        assert Qwen3TextEncoder(v5, 1).rope_theta == 5e6
        assert Qwen3TextEncoder(dict(base, rope_theta=5000000, rope_scaling=None), 1).rope_theta == 5e6
        assert Qwen3TextEncoder(dict(base, rope_theta=1.0, rope_scaling={"rope_theta": 3e6}), 1).rope_theta == 3e6
        assert Qwen3TextEncoder(base, 1).rope_theta == 10_000.0  # transformers' default
        no_head_dim = {k: v for k, v in base.items() if k != "head_dim"}
        assert Qwen3TextEncoder(no_head_dim, 1).head_dim == 128  # Qwen3Config default, not hidden // heads
    with pytest.raises(ValueError, match="num_layers"):
        Qwen3TextEncoder(base, base["num_hidden_layers"] + 1)
