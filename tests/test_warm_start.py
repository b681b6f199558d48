"""zimage.engine.warm_start: the first image's prompt encoding (and decoder start-up) done while the transformer
loads. On the CPU the thread is normally not started (worth_it); here it is forced, to check that the work lands in
the prompt cache and changes nothing in the image."""

import logging

import torch

from zimage.engine import warm_start
from zimage.engine.device import on_device
from zimage.engine.config import EngineConfig
from zimage.engine.engine import Engine
from zimage.request import GenerateRequest


def _request(prompt="a warm fox"):
    return GenerateRequest(prompts=(prompt,), width=256, height=256, steps=2, seed=3)


def test_worth_it_only_on_a_gpu_with_work_and_resident_networks():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = torch.nn.Linear(2, 2)
    assert not warm_start.worth_it(cpu, on_cpu, on_cpu, ("p",), (64, 64))  # CPU: never
    assert not warm_start.worth_it(cuda, on_cpu, on_cpu, (), None)  # nothing to do
    assert not warm_start.worth_it(cuda, on_cpu, on_cpu, ("p",), None)  # networks not on the GPU (offloaded)
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
    assert "warm start skipped" in caplog.text and "injected" in caplog.text
    monkeypatch.undo()
    assert loaded.generate(_request("x")).images  # the first generate does the work itself
