"""FP8 storage and FP8 matmul of the transformer's matrices (zimage.speed.fp8), on CPU.

Measured here (torch 2.13 CPU; the asserts keep a margin): weight round trip max |error| = 0.036 of the row absmax
(bound 2^-4 = 0.0625), rel L2 2.6%; one 512->256 layer rel L2 2.6% (dequant) and 3.7% (fp8 matmul, activations
quantised too) against the bf16 Linear; the whole tiny transformer in bf16: 8.0% rel L2 (dequant) and 8.9% (fp8
matmul) against the unquantised bf16 model, whose own distance to fp32 is 1.3%. The tiny model (width 64, random
weights) is a harsh case: each of its 33 quantised layers adds ~2.6% and nothing averages out.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zimage.memory.sizes import network_sizes
from zimage.models.tensor_names import FP8_KEEP as PLANNED_KEEP
from zimage.models.z_image import ZImageTransformer
from zimage.speed.fp8 import (FP8, FP8_KEEP, FP8_MAX, FP8Linear, _quantize_rows, fp8_matmul_supported, fp8_names,
                              quantize_transformer)
from zimage.speed.fuse import fuse_block
from zimage.weights.tiny import FULL_TRANSFORMER, TINY_TRANSFORMER

BF16 = torch.bfloat16


def rel_l2(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def tiny_model(dtype=BF16, seed=0):
    torch.manual_seed(seed)
    model = ZImageTransformer(TINY_TRANSFORMER).eval()
    with torch.no_grad():
        for p in model.parameters():  # as tests/models/test_z_image.py: every parameter matters
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(dtype)


def run_tiny(model, dtype=BF16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 12, 10, generator=g).to(dtype)
    caps = [torch.randn(n, TINY_TRANSFORMER["cap_feat_dim"], generator=g).to(dtype) for n in (7, 7)]
    with torch.no_grad():
        return model(x, torch.tensor([0.3, 0.8]), model.prepare(caps, 12, 10)).float()


def linear(n_in=512, n_out=256, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).to(BF16)


def fake_scaled_mm(calls):
    """A reference torch._scaled_mm that checks what the CUDA rowwise kernel requires (aten RowwiseScaledMM.cu
    check_inputs, torch/_meta_registrations.py _check_scaled_mm_sizes) and computes the product in fp32."""

    def scaled_mm(a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        (m, k), (k2, n) = a.shape, b.shape
        assert a.dtype == FP8 and b.dtype == FP8 and k == k2
        assert a.stride(1) == 1 and a.stride(0) >= k, f"mat1 must be row-major, strides {a.stride()}"
        assert b.stride(0) == 1 and b.stride(1) >= k, f"mat2 must be column-major, strides {b.stride()}"
        assert k % 16 == 0 and n % 16 == 0, (k, n)
        assert scale_a.dtype == scale_b.dtype == torch.float32
        assert scale_a.shape == (m, 1) and scale_b.shape == (1, n)
        assert scale_a.is_contiguous() and scale_b.is_contiguous()
        assert scale_a.stride(0) == 1 and scale_b.stride(1) == 1
        assert out_dtype == BF16 and scale_result is None
        if bias is not None:
            assert bias.dtype == BF16 and bias.shape == (n,) and bias.stride(0) == 1
        calls.append((m, k, n))
        out = (a.float() * scale_a) @ (b.float() * scale_b)
        return (out if bias is None else out + bias.float()).to(out_dtype)

    return scaled_mm


def test_round_trip_error_is_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * torch.logspace(-3, 2, 256)[:, None]  # rows of very different scales
    w[3] = 0  # an all-zero row: zeros back, no NaN
    w8, scale = _quantize_rows(w)
    assert w8.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (256, 1)
    back = w8.float() * scale
    err = (back - w).abs()
    absmax = w.abs().amax(dim=1, keepdim=True)
    # 3 mantissa bits: round to nearest is within 2^-4 of the value (normals), 2^-10 of the scale (subnormals)
    assert (err <= 2 ** -4 * w.abs() + 2 ** -10 * scale + 1e-6 * absmax).all()
    worst = (err / absmax.clamp(min=1e-30)).max().item()
    assert worst <= 2 ** -4  # measured 0.036
    assert rel_l2(back, w) < 0.035  # measured 0.026
    assert torch.equal(back[3], torch.zeros(512))
    assert (w8.float().abs().amax(dim=1)[absmax[:, 0] > 0] == FP8_MAX).all()  # each row uses the full fp8 range


def test_dequant_layer_is_close_to_bf16_linear():
    lin = linear()
    x = torch.randn(4, 33, 512, generator=torch.Generator().manual_seed(1)).to(BF16)
    q = FP8Linear.from_linear(lin, matmul=False)
    assert (q.in_features, q.out_features, q.compute_dtype, q.matmul) == (512, 256, BF16, False)
    assert q.weight.dtype == FP8 and not q.weight.requires_grad and q.scale.shape == (256, 1)
    assert q.bias.dtype == BF16 and torch.equal(q.bias, lin.bias)
    got = q(x)
    assert got.dtype == BF16 and got.shape == (4, 33, 256)
    assert rel_l2(got, lin(x)) < 0.05  # measured 0.026
    lin_nb = linear(bias=False)
    assert rel_l2(FP8Linear.from_linear(lin_nb)(x), lin_nb(x)) < 0.05


def test_state_dict_and_to_carry_the_fp8_weight():
    q = FP8Linear.from_linear(linear())
    sd = q.state_dict()
    assert set(sd) == {"weight", "scale", "bias"}
    assert sd["weight"].dtype == FP8 and sd["scale"].dtype == torch.float32
    assert q.weight in list(q.parameters())  # code walking parameters() (device checks, streaming) sees it
    fresh = FP8Linear(512, 256, bias=True, compute_dtype=BF16)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 512).to(BF16)
    assert torch.equal(fresh(x), q(x))
    moved = q.to("meta")
    assert moved.weight.is_meta and moved.weight.dtype == FP8 and moved.scale.is_meta and moved.bias.is_meta


def test_matmul_call_contract(monkeypatch):
    """matmul=True calls torch._scaled_mm as the CUDA rowwise kernel requires; its result equals the exact product
    of the quantised operands, and stays near the bf16 Linear."""
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm(calls))
    lin = linear()
    x = torch.randn(3, 11, 512, generator=torch.Generator().manual_seed(2)).to(BF16)
    q = FP8Linear.from_linear(lin, matmul=True)
    got = q(x)
    assert calls == [(33, 512, 256)] and got.shape == (3, 11, 256) and got.dtype == BF16
    x8, sx = _quantize_rows(x.reshape(-1, 512))
    exact = (x8.float() * sx) @ (q.weight.float() * q.scale).t() + lin.bias.float()
    assert rel_l2(got, exact.reshape(3, 11, 256)) < 0.01  # bf16 output rounding only
    assert rel_l2(got, lin(x)) < 0.06  # measured 0.037: weights and activations in fp8
    # a transposed (non-contiguous) input still reaches _scaled_mm row-major
    xt = torch.randn(512, 7).to(BF16).t()
    torch.testing.assert_close(q(xt), q(xt.contiguous()), rtol=0, atol=0)
    q_nb = FP8Linear.from_linear(linear(bias=False), matmul=True)
    assert q_nb(x).shape == (3, 11, 256) and calls[-1] == (33, 512, 256)


def test_matmul_with_this_builds_scaled_mm_matches_dequant_path():
    """torch 2.13's CPU build runs rowwise-scaled float8 _scaled_mm: the real op against the fp32 reference."""
    lin = linear()
    x = torch.randn(2, 40, 512, generator=torch.Generator().manual_seed(3)).to(BF16)
    q = FP8Linear.from_linear(lin, matmul=True)
    try:
        got = q(x)
    except RuntimeError as e:  # a build without a CPU kernel: the contract test above still holds
        pytest.skip(f"torch._scaled_mm does not run here: {e}")
    calls = []
    want = fake_scaled_mm(calls)
    x8, sx = _quantize_rows(x.reshape(-1, 512))
    ref = want(x8, q.weight.t(), sx, q.scale.t(), bias=q.bias, out_dtype=BF16).reshape(2, 40, 256)
    assert rel_l2(got, ref) < 0.005
    assert rel_l2(got, FP8Linear.from_linear(lin, matmul=False)(x)) < 0.05  # activation quantisation only


def test_matmul_refuses_what_scaled_mm_cannot_run():
    with pytest.raises(ValueError, match="multiples of 16"):
        FP8Linear.from_linear(nn.Linear(64, 170).to(BF16), matmul=True)
    with pytest.raises(ValueError, match="bf16"):
        FP8Linear.from_linear(nn.Linear(64, 64), matmul=True)  # fp32


@pytest.mark.parametrize("matmul", [False, True])
def test_forward_compiles_without_graph_breaks(matmul):
    lin = linear(64, 32)
    q = FP8Linear.from_linear(lin, matmul=matmul)
    try:
        q(torch.randn(3, 5, 64).to(BF16))
    except RuntimeError as e:  # torch < 2.13 has no rowwise-scaled CPU kernel; the eager contract tests still hold
        pytest.skip(f"torch._scaled_mm does not run here: {e}")
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    for m in (5, 9):
        x = torch.randn(3, m, 64).to(BF16)
        torch.testing.assert_close(compiled(x), q(x), rtol=0, atol=0)


def test_quantized_tiny_transformer_stays_close():
    want = run_tiny(tiny_model())
    model = tiny_model()
    n = quantize_transformer(model, matmul=False)
    # 3 blocks with modulation x 8 linears + 1 context refiner x 7 + the final layer's 2
    assert n == 33 == sum(isinstance(m, FP8Linear) for m in model.modules())
    got = run_tiny(model)
    assert torch.isfinite(got).all()
    assert rel_l2(got, want) < 0.15  # measured 0.080 (bf16 itself is 0.013 from fp32)
    assert quantize_transformer(model, matmul=False) == 0  # idempotent


def test_quantize_frees_each_bf16_weight_before_the_next_layer(monkeypatch):
    """Peak memory grows by one layer only: when layer k+1 is quantised, layer k's bf16 weight is already gone."""
    import gc
    import weakref

    model = tiny_model()
    gc.collect()
    refs, alive_at_next = [], []
    original = FP8Linear.from_linear.__func__

    def recording(cls, lin, matmul=False):
        alive_at_next.append(any(r() is not None for r in refs))
        refs.append(weakref.ref(lin.weight))
        return original(cls, lin, matmul)

    monkeypatch.setattr(FP8Linear, "from_linear", classmethod(recording))
    assert quantize_transformer(model) == 33
    assert not any(alive_at_next) and all(r() is None for r in refs)


def test_fp8_matmul_tiny_transformer(monkeypatch):
    """matmul=True on the tiny model: the FFN (width 170) stays bf16, the rest runs through _scaled_mm."""
    want = run_tiny(tiny_model())
    model = tiny_model()
    assert quantize_transformer(model, matmul=True) == 33 - 3 * 4
    assert all(type(b.feed_forward.w1) is nn.Linear for b in model.blocks())
    calls = []
    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm(calls))
    got = run_tiny(model)
    assert len(calls) == 21
    assert rel_l2(got, want) < 0.15  # measured 0.089


def test_fused_then_quantized():
    want = run_tiny(tiny_model())
    model = tiny_model()
    for block in model.blocks():
        fuse_block(block)
    assert quantize_transformer(model, matmul=False) == 33 - 4 * 3  # q,k,v -> qkv and w1,w3 -> w13, per block
    assert isinstance(model.layers[0].attention.to_qkv, FP8Linear)
    assert isinstance(model.layers[0].feed_forward.w13, FP8Linear)
    assert rel_l2(run_tiny(model), want) < 0.15


def test_quantized_bytes_equal_the_planners_fp8_sizes():
    """What sizes.py plans for fp8 (1 byte per fp8-counted element, 2 for the rest) is what quantize_transformer
    leaves, block by block, plus 4 bytes per output row of each quantised layer for its scales."""
    model = tiny_model()
    before = model.state_dict()
    planned = network_sizes({k: tuple(v.shape) for k, v in before.items()}, dtype_bytes=2)
    blocks = ("noise_refiner.", "context_refiner.", "layers.")
    blocks_bf16 = sum(t.numel() * t.element_size() for k, t in before.items() if k.startswith(blocks))
    quantize_transformer(model, matmul=False)
    state = model.state_dict()

    def nbytes(keep):
        return sum(t.numel() * t.element_size() for k, t in state.items() if not k.endswith(".scale") and keep(k))

    assert tuple(nbytes(lambda k: k.startswith(f"layers.{i}.")) for i in range(len(model.layers))) == planned.blocks_fp8
    assert nbytes(lambda k: not k.startswith("layers.")) == planned.rest_fp8
    fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert sum(t.numel() * 4 for k, t in state.items() if k.endswith(".scale")) == 4 * sum(
        m.out_features for m in fp8_layers)
    # the matrices take half their bf16 bytes; the blocks in all (norms, biases, scales included) about half
    assert sum(m.weight.numel() * m.weight.element_size() for m in fp8_layers) * 2 == sum(
        before[f"{n}.weight"].numel() * 2 for n in fp8_names(tiny_model()))
    blocks_after = sum(t.numel() * t.element_size() for k, t in state.items() if k.startswith(blocks))
    assert 0.5 < blocks_after / blocks_bf16 < 0.56  # tiny: scales add 4/in_features, 1-D tensors stay bf16


@pytest.mark.parametrize("config", [TINY_TRANSFORMER, FULL_TRANSFORMER], ids=["tiny", "full"])
def test_quantized_names_equal_sizes_fp8_accounting(config):
    """The layers quantised are exactly the matrices sizes.py counts at 1 byte (and, at full size, with
    matmul=True too: every dimension there is a multiple of 16)."""
    with torch.device("meta"):
        model = ZImageTransformer(config)
    counted = {k for k, v in model.state_dict().items() if v.dim() >= 2 and not PLANNED_KEEP.search(k)}
    assert FP8_KEEP is PLANNED_KEEP
    assert {f"{n}.weight" for n in fp8_names(model)} == counted
    if config is FULL_TRANSFORMER:
        assert fp8_names(model, matmul=True) == fp8_names(model)
        assert len(counted) == 34 * 8 - 2 + 2  # 34 blocks x 8 (context refiners: no adaLN) + final layer's 2
    kinds = {n.split(".", 2)[-1] for n in fp8_names(model)}
    assert kinds >= {"attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                     "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"}
    assert not [n for n in fp8_names(model) if "embed" in n]


def test_fp8_matmul_supported(monkeypatch):
    assert not fp8_matmul_supported("cpu")
    assert not fp8_matmul_supported(torch.device("meta"))
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, want in [((9, 0), True), ((8, 9), True), ((10, 0), True), ((8, 0), False), ((7, 5), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert fp8_matmul_supported("cuda") is want
        assert fp8_matmul_supported(torch.device("cuda", 0)) is want
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delattr(torch, "_scaled_mm")
    assert not fp8_matmul_supported("cuda")


# ---------------------------------------------------------------- the engine with --fp8 (the user's lossy choice)
def test_engine_with_fp8_quantises_the_transformer_plans_for_it_and_says_so(tiny_folder):
    from zimage.engine.engine import Engine
    from zimage.request import GenerateRequest

    request = GenerateRequest(prompts=("a lighthouse",), width=256, height=256, steps=2, seed=5)
    plain = Engine.load(model=str(tiny_folder), device="cpu", speed="eager")
    fp8 = Engine.load(model=str(tiny_folder), device="cpu", speed="eager", fp8=True)
    layers = [m for m in fp8.transformer.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == len(fp8_names(plain.transformer))
    assert not any(m.matmul for m in layers)  # no FP8 tensor cores on a CPU: stored in fp8, multiplied in fp32
    assert fp8.policy.plan.weight_dtype == "fp8" and fp8.describe()["dtype"] == "fp32+fp8"
    assert plain.describe()["dtype"] == "fp32"
    result = fp8.generate(request)
    assert result.images[0].metadata.dtype == "fp32+fp8"  # the PNG records that the image is from fp8 weights

    def latents(engine):
        cond, _ = engine.encode([request])
        return engine.denoise(cond, engine.noise(request.image_seeds(), request), request)[0]

    a, b = latents(plain), latents(fp8)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0 < rel < 0.2, rel  # changed (lossy), but the same image in kind


def test_compile_mode_does_not_fuse_fp8_layers(tiny_folder):
    from zimage.engine.engine import Engine

    engine = Engine.load(model=str(tiny_folder), speed="compile", fp8=True)
    assert engine.speed == "compile"  # an fp8 plan keeps the transformer resident: it compiles
    attn = engine.transformer.layers[0].attention
    assert isinstance(attn.to_q, FP8Linear) and not hasattr(attn, "to_qkv")
