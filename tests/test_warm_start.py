"""zimage.engine.warm_start: the first image's decoder start-up, a stand-in step and its prompt encoding done while
the model loads. On the CPU it is normally not done (worth_it); here it is forced, to check that the work lands in
the prompt cache and changes nothing in the image."""

import logging

import torch

from zimage.engine import warm_start
from zimage.memory.policy import on_device
from zimage.engine.config import EngineConfig
from zimage.engine.engine import Engine
from zimage.request import GenerateRequest


def _request(prompt="a warm fox"):
    return GenerateRequest(prompts=(prompt,), width=256, height=256, steps=2, seed=3)


def test_worth_it_only_on_a_gpu_with_work_for_resident_networks():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = torch.nn.Linear(2, 2)
    stand_in = warm_start.StandIn({}, torch.bfloat16, 8)
    assert not warm_start.worth_it(cpu, ("p",), on_cpu, (64, 64), stand_in)  # CPU: never
    assert not warm_start.worth_it(cuda, (), None, None, None)  # nothing to do
    assert not warm_start.worth_it(cuda, (), on_cpu, (64, 64), None)  # the VAE not on the GPU (offloaded)
    assert warm_start.worth_it(cuda, ("p",), None, None, None)  # prompts to encode
    assert warm_start.worth_it(cuda, (), None, (64, 64), stand_in)
    meta_cuda = torch.nn.Linear(2, 2, device="meta")
    meta_cuda.weight = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
    assert not on_device(meta_cuda, cuda)


def test_warm_prompts_are_cached_and_the_image_is_unchanged(tiny_folder, engine, monkeypatch):
    monkeypatch.setattr(warm_start, "worth_it", lambda *a: True)
    cfg = EngineConfig(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager",
                       warm_prompts=("a warm fox",), warm_size=(256, 256))
    warmed = Engine.load(cfg)
    assert warmed.prompts.cached("a warm fox")
    assert warmed.prompts.misses == 1
    got = warmed.generate(_request()).images[0].image
    assert warmed.prompts.hits == 1 and warmed.prompts.misses == 1  # the first generate did not encode again
    engine.prompts.clear_cache()
    ref = engine.generate(_request()).images[0].image
    assert got.tobytes() == ref.tobytes()


def test_a_failing_warm_start_is_logged_and_loading_goes_on(tiny_folder, monkeypatch, caplog):
    monkeypatch.setattr(warm_start, "worth_it", lambda *a: True)
    from zimage.engine import text

    def boom(self, prompts):
        raise RuntimeError("CUDA out of memory (injected)")

    monkeypatch.setattr(text.PromptEncoder, "encode", boom)
    cfg = EngineConfig(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager", warm_prompts=("x",))
    with caplog.at_level(logging.WARNING, logger="zimage"):
        loaded = Engine.load(cfg)
    assert "prompt(s) encoded skipped" in caplog.text and "injected" in caplog.text
    monkeypatch.undo()
    assert loaded.generate(_request("x")).images  # the first generate does the work itself


def test_a_failing_text_encoder_read_fails_the_load_without_reading_the_transformer(tiny_folder, monkeypatch):
    import pytest

    from zimage.weights import load

    read = []
    real = load.load_network

    def failing(checked, *args, **kwargs):
        read.append(checked.network.component.name)
        if checked.network.component.name == "text_encoder":
            raise OSError("disk read error (injected)")
        return real(checked, *args, **kwargs)

    monkeypatch.setattr(load, "load_network", failing)
    with pytest.raises(OSError, match="injected"):
        Engine.load(EngineConfig(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager",
                                 warm_prompts=("x",)))
    assert read == ["vae", "text_encoder"]


def _transformer_config(folder):
    import json

    return json.loads((folder / "transformer" / "config.json").read_text())


def test_the_stand_in_is_the_transformer_cut_to_one_block_of_each_kind_with_zero_weights(tiny_folder):
    config = _transformer_config(tiny_folder)
    model = warm_start.stand_in_transformer(config, torch.device("cpu"), torch.bfloat16)
    assert (len(model.layers), len(model.noise_refiner), len(model.context_refiner)) == (1, 1, 1)
    params = list(model.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and not p.any() for p in params)
    assert warm_start.stand_in_bytes(config, torch.bfloat16) == sum(p.numel() * 2 for p in params)
    assert config["n_layers"] > 1  # the real one has more: the cut is the stand-in's own


def test_the_stand_in_fits_only_the_resident_plan_with_room_for_it(tiny_folder, engine):
    from dataclasses import replace

    config = _transformer_config(tiny_folder)
    need = warm_start.stand_in_bytes(config, torch.bfloat16)
    tokenizer = engine.prompts.tokenizer

    def spec(plan, texts=("a fox",)):
        return warm_start.stand_in_for(plan, config, torch.bfloat16, tokenizer, texts, 512)

    resident = replace(engine.policy.plan, budget_bytes=10 * need, peak_bytes=9 * need)
    assert resident.kind == "resident"
    got = spec(resident)
    assert got.caption_tokens == engine.prompts.count_tokens("a fox") and got.dtype is torch.bfloat16
    assert spec(resident, ()) is None  # no first prompt: its caption shape is unknown
    assert spec(replace(resident, peak_bytes=10 * need - need // 2)) is None  # no room for the stand-in's weights
    assert spec(replace(resident, transformer_streamed=1)) is None
    assert spec(replace(resident, weight_dtype="fp8")) is None
    long = "fox " * 600
    assert warm_start.stand_in_for(resident, config, torch.bfloat16, tokenizer, (long,),
                                   64).caption_tokens == 64  # as many tokens as the encoder reads


def test_the_stand_in_step_runs_the_first_image_shapes_and_leaves_the_image_unchanged(tiny_folder, monkeypatch):
    from zimage.models.z_image import ZImageTransformer

    calls = []
    real_forward = ZImageTransformer.forward

    def spy(self, x, t, ctx):
        calls.append((len(self.layers), tuple(x.shape), ctx.n_tokens, ctx.cap.shape[1]))
        return real_forward(self, x, t, ctx)

    monkeypatch.setattr(ZImageTransformer, "forward", spy)
    cfg = EngineConfig(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager")
    loaded = Engine.load(cfg)
    ref = loaded.generate(_request()).images[0].image
    real = calls[0]
    n_real = len(loaded.transformer.layers)
    calls.clear()
    tokens = loaded.prompts.count_tokens("a warm fox")
    spec = warm_start.StandIn(_transformer_config(tiny_folder), torch.float32, tokens)
    warm = warm_start.WarmStart(torch.device("cpu"), ("a warm fox",), loaded.vae, (256, 256), spec)
    warm.before_text_encoder()
    warm.with_text_encoder(loaded.prompts)
    assert n_real > 1 and calls == [(1,) + real[1:]]  # one step of the 1-layer stand-in, the real step's shapes
    assert loaded.prompts.cached("a warm fox")
    got = loaded.generate(_request()).images[0].image
    assert got.tobytes() == ref.tobytes()
