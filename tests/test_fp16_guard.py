"""fp16: the guard clamps inf/NaN out of the transformer's residual branches; non-finite latents never become an
image (NonFiniteOutputError, no file)."""

from __future__ import annotations

import pytest
import torch

from zimage.engine.fp16_guard import FP16_MAX, _clamp, install_fp16_guard
from zimage.errors import NonFiniteOutputError
from zimage.request import GenerateRequest


def blocks(transformer):
    return list(transformer.noise_refiner) + list(transformer.context_refiner) + list(transformer.layers)


def blow_up_ffn(transformer, factor: float = 300.0) -> None:
    """Scale the SwiGLU input projections so that silu(w1 x) * w3 x overflows fp16 (as the real model's do)."""
    with torch.no_grad():
        for b in blocks(transformer):
            ff = b.feed_forward
            for w in ([ff.w13] if hasattr(ff, "w13") else [ff.w1, ff.w3]):  # fused by zimage.speed.fuse
                w.weight.mul_(factor)


def tiny_fp16_transformer():
    from diffusers import ZImageTransformer2DModel

    from zimage.weights.tiny import TINY_TRANSFORMER

    torch.manual_seed(0)
    return ZImageTransformer2DModel(**TINY_TRANSFORMER).half().eval()


def forward(m):
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 1, 8, 8, generator=g).half()]
    cap = [torch.randn(7, 32, generator=g).half()]
    with torch.no_grad():
        return m(x, torch.tensor([0.5]).half(), cap, return_dict=False)[0][0]


def test_clamp_values():
    t = torch.tensor([1.0, float("inf"), float("-inf"), float("nan"), -3.0], dtype=torch.float16)
    assert _clamp(t).tolist() == [1.0, FP16_MAX, -FP16_MAX, 0.0, -3.0]


def test_hooks_on_a_small_module():
    """The clamping hooks as installed, on a block-shaped stand-in: outputs and w2's input are made finite."""

    class FF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w2 = torch.nn.Identity()

        def forward(self, x):
            return self.w2(x * float("inf"))

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.Identity()
            self.feed_forward = FF()

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.noise_refiner = torch.nn.ModuleList([Block()])
            self.context_refiner = torch.nn.ModuleList([Block()])
            self.layers = torch.nn.ModuleList([Block(), Block()])

    seen = []
    stub = Stub()
    stub.layers[0].feed_forward.w2.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    assert install_fp16_guard(stub) == 12
    x = torch.tensor([1.0, -2.0, float("nan")], dtype=torch.float16)
    assert stub.layers[0].attention(x).tolist() == [1.0, -2.0, 0.0]
    out = stub.layers[0].feed_forward(torch.tensor([1.0, -1.0], dtype=torch.float16))
    assert seen[0].tolist() == [FP16_MAX, -FP16_MAX]  # w2's input was clamped before w2 ran
    assert out.tolist() == [FP16_MAX, -FP16_MAX]


def test_guard_makes_an_overflowing_fp16_transformer_finite():
    m = tiny_fp16_transformer()
    normal = forward(m)
    assert torch.isfinite(normal).all()
    blow_up_ffn(m)
    assert not torch.isfinite(forward(m)).all()  # the failure the guard exists for
    assert install_fp16_guard(m) == 3 * len(blocks(m)) == 12
    guarded = forward(m)
    assert guarded.dtype == torch.float16 and torch.isfinite(guarded).all()


def test_guard_does_not_change_finite_outputs():
    a = tiny_fp16_transformer()
    b = tiny_fp16_transformer()
    install_fp16_guard(b)
    assert torch.equal(forward(a), forward(b))


@pytest.fixture(scope="module")
def fp16_engine(tiny_folder):
    from zimage.engine.engine import Engine

    return Engine.load(model=str(tiny_folder), device="cpu", dtype="fp16", speed="eager")


def test_fp16_engine_installs_the_guard_and_keeps_the_vae_fp32(fp16_engine, engine):
    assert fp16_engine.dtype == torch.float16
    assert next(fp16_engine.transformer.parameters()).dtype == torch.float16
    assert next(fp16_engine.vae.parameters()).dtype == torch.float32  # the VAE overflows in fp16
    for b in blocks(fp16_engine.transformer):
        assert len(b.attention._forward_hooks) == 1 and len(b.feed_forward._forward_hooks) == 1
        assert len(b.feed_forward.w2._forward_pre_hooks) == 1
    for b in blocks(engine.transformer):  # fp32: untouched
        assert not b.attention._forward_hooks and not b.feed_forward.w2._forward_pre_hooks


def test_fp16_engine_with_overflowing_weights_still_gives_finite_latents(fp16_engine):
    """Through the engine's own step function: with the guard, overflowing activations give finite latents; the
    same weights without the guard give NonFiniteOutputError (not an image)."""
    req = GenerateRequest(prompts=("a cat",), width=256, height=256, steps=2, seed=1)
    cond, _ = fp16_engine.encode([req])
    blow_up_ffn(fp16_engine.transformer)
    latents, _ = fp16_engine.denoise(cond, fp16_engine.noise(req.image_seeds(), req), req)
    assert torch.isfinite(latents).all()
    for b in blocks(fp16_engine.transformer):  # take the guard off
        b.attention._forward_hooks.clear()
        b.feed_forward._forward_hooks.clear()
        b.feed_forward.w2._forward_pre_hooks.clear()
    with pytest.raises(NonFiniteOutputError, match="NaN/inf"):
        fp16_engine.denoise(cond, fp16_engine.noise(req.image_seeds(), req), req)


def test_nan_latents_raise_instead_of_an_image(engine, monkeypatch):
    import zimage.engine.sampling as sampling

    monkeypatch.setattr(sampling, "euler_step", lambda x, v, s, s1: x * float("nan"))
    with pytest.raises(NonFiniteOutputError, match="no image was written"):
        engine.generate(GenerateRequest(prompts=("a cat",), width=256, height=256, steps=1, seed=1))


def test_cli_writes_no_file_for_nan_latents(monkeypatch, tmp_path, capsys):
    import zimage.engine.sampling as sampling
    from zimage.cli.main import main

    monkeypatch.setattr(sampling, "euler_step", lambda x, v, s, s1: x * float("nan"))
    rc = main(["generate", "-p", "a cat", "--model", "tiny-random", "--device", "cpu", "--width", "256", "--height",
               "256", "--steps", "1", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "zimage: error: the transformer produced NaN/inf" in err and "--dtype" in err
    assert list(tmp_path.iterdir()) == []


def test_guard_installs_once_per_module():
    """The engine installs the guard after every placement: a second call adds no hook (a doubled clamp is harmless
    but every hook costs a launch per block)."""
    m = tiny_fp16_transformer()
    assert install_fp16_guard(m) == 12
    assert install_fp16_guard(m) == 0
    assert sum(len(b.attention._forward_hooks) for b in blocks(m)) == len(blocks(m))
