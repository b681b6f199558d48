"""Speed-path selection and the fast paths' equivalence, on CPU (CI has no GPU; the GPU figures are in
BENCHMARKS.md)."""

from __future__ import annotations

import logging

import pytest
import torch

from zimage.errors import UsageError
from zimage.request import GenerateRequest
from zimage.speed import apply as speed_apply
from zimage.speed.modes import COMPILE_BREAK_EVEN_IMAGES, resolve_speed
from zimage.models.z_image import CUDNN, NATIVE, apply_rope
from zimage.speed.attention import attention_backend, choose_attention_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
REQ = GenerateRequest(prompts=("a lighthouse at dusk",), width=256, height=256, steps=2, seed=11)


@pytest.mark.parametrize("mode,device,expected,want", [
    ("auto", CPU, None, "eager"),  # never compile a 6B model on a CPU
    ("auto", CUDA, None, "compile"),  # a server: many images
    ("auto", CUDA, 1, "eager"),  # a one-image CLI run never pays for compilation
    ("auto", CUDA, COMPILE_BREAK_EVEN_IMAGES - 1, "eager"),
    ("auto", CUDA, COMPILE_BREAK_EVEN_IMAGES, "compile"),
    ("eager", CUDA, None, "eager"),
    ("compile", CPU, 1, "compile"),  # explicit choices are obeyed
])
def test_resolve_speed(mode, device, expected, want):
    assert resolve_speed(mode, device, expected) == want


def test_unknown_speed_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown speed mode 'turbo'; choose one of auto, eager, compile"):
        resolve_speed("turbo", CPU, None)


@pytest.mark.parametrize("capability,want", [((9, 0), CUDNN), ((10, 0), CUDNN), ((8, 9), NATIVE), ((7, 5), NATIVE)])
def test_attention_backend_by_gpu(monkeypatch, capability, want):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert choose_attention_backend(CUDA) == want


def test_attention_backend_on_cpu_is_pytorchs_choice():
    assert choose_attention_backend(CPU) == NATIVE


def test_real_rope_equals_complex_rope(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, generator=g)  # (B, L, H, D)
    freqs = torch.polar(torch.ones(2, 7, 8), torch.randn(2, 7, 8, generator=g))  # (B, L, D/2) complex
    eager = apply_rope(x, torch.view_as_real(freqs))
    reference = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs.unsqueeze(2)).flatten(3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # take the real-arithmetic branch
    real = apply_rope(x, torch.view_as_real(freqs))
    torch.testing.assert_close(eager, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(real, reference, rtol=0, atol=1e-6)


def _latents(engine, request=REQ):
    cond, _ = engine.encode([request])
    latents, _ = engine.denoise(cond, engine.noise(request.image_seeds(), request), request)
    return latents


def test_fused_projections_give_the_same_latents(tiny_folder):
    from zimage.engine.engine import Engine
    from zimage.speed.fuse import FusedSwiGLU, fuse_block

    engine = Engine.load(model=str(tiny_folder), speed="eager")
    before = _latents(engine)
    for block in engine.transformer.blocks():
        fuse_block(block)
    block = engine.transformer.layers[0]
    assert isinstance(block.feed_forward, FusedSwiGLU) and not hasattr(block.attention, "to_q")
    n_params = sum(p.numel() for p in engine.transformer.parameters())
    after = _latents(engine)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    # weights moved, not copied
    fresh = Engine.load(model=str(tiny_folder), speed="eager")
    assert n_params == sum(p.numel() for p in fresh.transformer.parameters())


def test_compile_mode_runs_and_matches_eager(tiny_folder, monkeypatch):
    """The compiled path end to end on the tiny model (the CPU compiles slowly: one small image), with the
    precompiled functions, as compile mode runs by default (conftest turns them off elsewhere)."""
    from zimage.engine.engine import Engine

    monkeypatch.setenv("ZIMAGE_PRECOMPILED", "1")

    eager = Engine.load(model=str(tiny_folder), device="cpu", speed="eager")
    compiled = Engine.load(model=str(tiny_folder), device="cpu", speed="compile")
    assert (eager.speed, compiled.speed) == ("eager", "compile")
    assert attention_backend(compiled.transformer) == choose_attention_backend(CPU)
    assert hasattr(compiled.transformer.layers[0].attention, "to_qkv")  # compiled mode fuses
    torch.testing.assert_close(_latents(compiled), _latents(eager), rtol=0, atol=1e-4)
    calls = [b._compiled_call_impl.calls for b in compiled.transformer.blocks()]
    assert sum(c["precompiled"] for c in calls) > 0 and sum(c["fallback"] for c in calls) == 0


def test_compile_is_refused_for_streamed_blocks(tiny_folder, caplog):
    """A plan that streams blocks keeps eager (hooks would be traced into the graph), and says so."""
    from zimage.engine.engine import Engine

    engine = Engine.load(model=str(tiny_folder), speed="eager")
    plan = type("Plan", (), {"kind": "stream", "transformer_streamed": 3})()
    with caplog.at_level(logging.WARNING, logger="zimage"):
        assert speed_apply.apply_speed(engine.parts, "compile", plan).mode == "eager"
    assert "not combined with streamed transformer blocks" in caplog.text


@pytest.mark.parametrize("kind", ["text-offload", "resident+tiled", "text-offload+tiled+fp8"])
def test_compile_is_kept_when_the_whole_transformer_is_resident(tiny_folder, monkeypatch, kind):
    """Only streamed transformer blocks stop compilation; offloading the text encoder or tiling the decode do not."""
    from zimage.engine.engine import Engine

    engine = Engine.load(model=str(tiny_folder), speed="eager")
    plan = type("Plan", (), {"kind": kind, "transformer_streamed": 0, "weight_dtype": "bf16"})()
    monkeypatch.setattr(speed_apply, "compile_blocks", lambda *a: None)  # the choice is under test, not inductor
    assert speed_apply.apply_speed(engine.parts, "compile", plan).mode == "compile"


def test_compile_settings_are_scoped_to_a_generation_and_restored(monkeypatch, tmp_path):
    """Compile mode's process-wide settings (dynamo's recompile limit, inductor's cache folder) hold only inside
    SpeedSetup.scoped() and are put back after, also when the body raises; a folder the user chose is kept; cuDNN's
    autotuning is left as the caller set it (it paid nothing: bench_vae_decode.py); eager mode touches nothing."""
    import os

    import torch

    from zimage.speed.apply import RECOMPILE_LIMIT, SpeedSetup, compile_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    limit, benchmark = torch._dynamo.config.recompile_limit, torch.backends.cudnn.benchmark
    setup = SpeedSetup("compile", "native", None, device=torch.device("cuda"))  # (no CUDA needed: flags only)
    with pytest.raises(RuntimeError, match="inside"):
        with setup.scoped():
            assert torch._dynamo.config.recompile_limit == max(limit, RECOMPILE_LIMIT)
            assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == compile_cache_dir()
            assert torch.backends.cudnn.benchmark == benchmark
            raise RuntimeError("inside")
    assert torch._dynamo.config.recompile_limit == limit and torch.backends.cudnn.benchmark == benchmark
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    with setup.scoped():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's choice stands
    with SpeedSetup("eager", "native", None).scoped():
        assert torch._dynamo.config.recompile_limit == limit and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(
            tmp_path / "mine")


@pytest.mark.parametrize("backend", [NATIVE, CUDNN])
def test_compiled_attention_graphs_are_ones_aotautograd_can_cache(backend):
    """A second process finds its compiled blocks in AOTAutograd's cache only if their graphs are cacheable: entering
    sdpa_kernel(...) inside a graph is not (it made 2 of 3 graphs bypass the cache on an H200). Traced here on the
    CPU with fake tensors (the cuDNN kernel itself only runs on CUDA), checked as AOTAutograd checks them."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    from zimage.models.z_image import Attention

    attention = Attention(dim=32, heads=2, qk_norm=True)
    attention.backend = backend
    graphs = []

    def inspect(gm, example_inputs):
        check_cacheable(gm)  # raises BypassAOTAutogradCache for a graph the cache must skip
        graphs.append(gm)
        return lambda *args: (torch.zeros(1, 8, 32),)  # nothing runs: the graph is what is tested

    torch._dynamo.reset()
    try:
        torch.compile(attention, backend=inspect, fullgraph=True)(torch.randn(1, 8, 32), None, None)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="cuDNN attention: Hopper or newer")
def test_direct_cudnn_attention_is_the_kernel_sdpa_picks():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zimage.models.z_image import cudnn_attention

    q, k, v = (torch.randn(1, 4, 1024, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(cudnn_attention(q, k, v), want)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="cuDNN attention: Hopper or newer")
def test_cudnn_attention_takes_the_projections_layout_and_answers_in_it():
    """zimage.models.z_image.Attention hands cuDNN (B, H, L, hd) views of (B, L, H, hd) tensors, uncopied: the
    output equals the contiguous inputs' bit for bit, and comes back in (B, L, H, hd) order (the reshape to
    (B, L, H*hd) after it is then a view, not a copy)."""
    from zimage.models.z_image import cudnn_attention

    q, k, v = (torch.randn(2, 1024, 4, 128, device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3) for _ in range(3))
    out = cudnn_attention(q, k, v)
    assert torch.equal(out, cudnn_attention(q.contiguous(), k.contiguous(), v.contiguous()))
    assert out.permute(0, 2, 1, 3).is_contiguous()
