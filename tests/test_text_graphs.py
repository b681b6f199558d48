"""The text encoder's CUDA-graph wrapper (zimage.speed.text_graphs), on CPU: the right-padding it relies on is exact
for real tokens, bucket choice, when graphs are used, and how speed modes and re-planning install or drop it. The
capture itself needs CUDA; here a fake graph that runs the same padded call stands in for it."""

from __future__ import annotations

import contextlib

import pytest
import torch

from zimage.memory.planner import make_plan
from zimage.models.qwen3 import Qwen3TextEncoder
from zimage.speed import apply as speed_apply
from zimage.speed import text_graphs
from zimage.speed.text_graphs import (
    GraphedTextEncoder,
    _Graph,
    bucket_for,
    length_buckets,
    use_text_graphs,
)
from zimage.weights.tiny import TINY_TEXT

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
VOCAB = 97
LENGTHS = (5, 17, 40)  # a batch padded to 40 by the tokenizer, then to the 64 bucket by the wrapper
# fp32, the same prompt alone vs padded in a longer batch: other matmul shapes round differently. Measured with these
# weights (activations up to ~10), 5 seeds: at most 3.3e-6; left padding instead (real tokens seeing padding) is off
# by ~10, so the tolerance cannot hide a wrong padding.
ATOL = 1e-5


@pytest.fixture(scope="module")
def encoder():
    """A tiny fp32 Qwen3TextEncoder (the tiny model's shapes), every weight random (norm weights around 1)."""
    torch.manual_seed(0)
    config = dict(TINY_TEXT, vocab_size=VOCAB, rope_theta=1e6, rms_norm_eps=1e-6)
    enc = Qwen3TextEncoder(config, num_layers=3).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return enc


def batch(lengths=LENGTHS, pad_id=3):
    """(ids, mask) as zimage.models.tokenizer makes them: (B, L_max) long, right-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def check_real_rows(encoder, got, ids, lengths):
    with torch.inference_mode():
        masked = encoder(ids, mask_of(lengths, ids.shape[1]))  # (B, L, D): PromptEncoder's eager call
        for i, n in enumerate(lengths):
            alone = encoder(ids[i : i + 1, :n])[0]  # (n, D): the prompt with no padding at all
            torch.testing.assert_close(got[i, :n], alone, rtol=0, atol=ATOL)
            torch.testing.assert_close(got[i, :n], masked[i, :n], rtol=0, atol=ATOL)


def mask_of(lengths, width):
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


def test_padded_unmasked_run_is_exact_on_real_rows(encoder):
    """The graphs' computation (right-padded to the bucket, no mask) equals the unpadded encoder on real tokens."""
    ids, mask = batch()
    wrapper = GraphedTextEncoder(encoder, CPU, max_tokens=512, capture=False)
    got = wrapper(ids, mask.bool())
    assert got.shape == (3, 40, encoder.hidden_size)  # the caller's shape, not the bucket's
    check_real_rows(encoder, got, ids, LENGTHS)


def test_graph_path_copies_in_replays_and_reuses(encoder, monkeypatch):
    """The static-buffer logic, with a fake graph whose replay runs the padded call on the static input."""
    captured = []

    class FakeGraph:
        def __init__(self, ids, out):
            self.ids, self.out = ids, out

        def replay(self):
            self.out.copy_(encoder(self.ids, None))

    def fake_capture(self, b, bucket):
        captured.append((b, bucket))
        ids = torch.full((b, bucket), 99, dtype=torch.long)  # junk: every call must overwrite all of it
        out = torch.empty(b, bucket, encoder.hidden_size)
        return _Graph(ids, out, FakeGraph(ids, out))

    monkeypatch.setattr(GraphedTextEncoder, "_capture", fake_capture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    wrapper = GraphedTextEncoder(encoder, CPU, max_tokens=512)
    ids, mask = batch()
    got = wrapper(ids, mask.bool())
    check_real_rows(encoder, got, ids, LENGTHS)
    assert got.data_ptr() == wrapper.graphs[(3, 64)].out.data_ptr()  # a view of the static output, no copy
    for lengths in [(30, 7), (9, 2)]:  # one (2, 32) graph; the second call's padding overwrites the first's ids
        ids, mask = batch(lengths)
        check_real_rows(encoder, wrapper(ids, mask.bool()), ids, lengths)
    assert torch.equal(wrapper.graphs[(2, 32)].ids, torch.nn.functional.pad(ids, (0, 32 - 9), value=0))
    assert captured == [(3, 64), (2, 32)]


def test_eager_beyond_the_largest_bucket_the_token_cap_and_the_graph_table(encoder, monkeypatch):
    calls = []
    monkeypatch.setattr(GraphedTextEncoder, "_capture", lambda self, b, n: calls.append((b, n)) or None)
    wrapper = GraphedTextEncoder(encoder, CPU, max_tokens=32, max_graphs=1, max_graph_tokens=64)
    for lengths in [(40,), (30, 30, 30)]:  # 40 > 32 tokens; 3 x 32 > 64 tokens
        ids, mask = batch(lengths)
        with torch.inference_mode():
            torch.testing.assert_close(wrapper(ids, mask.bool()), encoder(ids, mask.bool()), rtol=0, atol=0)
    assert calls == []  # neither tried a graph
    wrapper.graphs[(9, 9)] = object()  # the table is full: a new shape runs eager, unpadded
    ids, mask = batch((3,))
    with torch.inference_mode():
        torch.testing.assert_close(wrapper(ids, mask.bool()), encoder(ids, mask.bool()), rtol=0, atol=0)
    assert calls == []


def test_a_failed_capture_falls_back_to_eager_once(encoder, monkeypatch, caplog):
    calls = []

    def broken(self, b, n):
        calls.append((b, n))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphedTextEncoder, "_capture", broken)
    wrapper = GraphedTextEncoder(encoder, CPU)
    ids, mask = batch()
    for _ in range(2):
        with torch.inference_mode():
            torch.testing.assert_close(wrapper(ids, mask.bool()), encoder(ids, mask.bool()), rtol=0, atol=0)
    assert calls == [(3, 64)] and "capture of the text encoder failed" in caplog.text


@pytest.mark.parametrize("max_tokens,want", [
    (512, (32, 64, 128, 256, 512)), (300, (32, 64, 128, 256, 300)), (32, (32,)), (20, (20,)), (33, (32, 33)),
])
def test_length_buckets(max_tokens, want):
    assert length_buckets(max_tokens) == want


@pytest.mark.parametrize("length,want", [(1, 32), (32, 32), (33, 64), (200, 256), (512, 512), (513, None)])
def test_bucket_for(length, want):
    assert bucket_for(length, length_buckets(512)) == want


class Param:
    def __init__(self, device):
        self.device = device


class FakeEncoder:
    """Parameters that say they are on `devices` (no CUDA needed), and optional hooks."""

    def __init__(self, *devices, hooked=False):
        self._params = [Param(torch.device(d)) for d in devices]
        self._forward_hooks, self._forward_pre_hooks = ({1: None} if hooked else {}), {}

    def parameters(self, recurse=True):
        return iter(self._params)

    def modules(self):
        return iter([self])


class Plan:
    def __init__(self, text_offloaded):
        self.text_offloaded = text_offloaded


@pytest.mark.parametrize("device,plan,enc,want", [
    (CUDA, Plan(False), FakeEncoder("cuda:0", "cuda:0"), True),
    (CUDA, None, FakeEncoder("cuda:0"), True),  # no plan: the parameters decide
    (torch.device("cuda"), Plan(False), FakeEncoder("cuda:0"), True),  # index-less device means cuda:0
    (CPU, Plan(False), FakeEncoder("cpu"), False),  # no graphs off CUDA
    (CUDA, Plan(True), FakeEncoder("cuda:0"), False),  # text-offload plan: weights move per prompt
    (CUDA, Plan(False), FakeEncoder("cuda:0", "cpu"), False),  # a parameter on the host (embedding, streamed layer)
    (CUDA, Plan(False), FakeEncoder("cuda:1"), False),  # on another GPU
    (CUDA, Plan(False), FakeEncoder("cuda:0", hooked=True), False),  # a hook would be frozen into the graph
])
def test_use_text_graphs(device, plan, enc, want):
    assert use_text_graphs(device, plan, enc) is want


def test_use_text_graphs_on_a_real_cpu_module(encoder):
    assert not use_text_graphs(CUDA, Plan(False), encoder)  # its weights are on the CPU


@pytest.fixture(scope="module")
def own_engine(tiny_folder):
    from zimage.engine.engine import Engine

    return Engine.load(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager")


def test_eager_mode_leaves_the_plain_encoder(own_engine):
    assert own_engine.prompts.text_encoder is own_engine.text_encoder  # as loaded
    setup = speed_apply.apply_speed(own_engine.parts, "eager", own_engine.policy.plan)
    assert setup.text_encoder is own_engine.text_encoder


def test_compile_mode_on_cpu_keeps_the_plain_encoder(own_engine, monkeypatch):
    monkeypatch.setattr(speed_apply, "compile_blocks", lambda *a: None)  # the choice is under test, not inductor
    setup = speed_apply.apply_speed(own_engine.parts, "compile", own_engine.policy.plan)
    assert setup.mode == "compile" and setup.text_encoder is own_engine.text_encoder
    speed_apply.apply_speed(own_engine.parts, "eager", own_engine.policy.plan)  # back (fusion stays: same outputs)


def test_every_placement_gets_fresh_graphs_or_none(own_engine, monkeypatch):
    """Where graphs are allowed, compile wraps the prompt encoder's text encoder only; each placement drops the old
    graphs and wraps fresh only under a plan that keeps the text encoder whole on the device; eager mode unwraps."""
    from dataclasses import replace

    monkeypatch.setattr(text_graphs, "use_text_graphs", lambda device, plan, enc: not plan.text_offloaded)
    monkeypatch.setattr(speed_apply, "compile_blocks", lambda *a: None)
    plain = own_engine.text_encoder
    s = own_engine.sizes
    layers = len(s.text_encoder.blocks)
    resident = make_plan(s, 2**30, 256, 256, 1, 0, layers, False, False, False)
    eager_config = own_engine.config
    try:
        own_engine.config = replace(eager_config, speed="compile")
        own_engine.place(resident)
        first = own_engine.prompts.text_encoder
        assert isinstance(first, GraphedTextEncoder) and first.encoder is plain and own_engine.text_encoder is plain
        assert first.buckets[-1] == own_engine.prompts.max_tokens
        own_engine.place(make_plan(s, 2**30, 256, 256, 1, 0, 0, True, False, False))  # text offloaded
        assert own_engine.prompts.text_encoder is plain
        own_engine.place(resident)
        again = own_engine.prompts.text_encoder
        assert isinstance(again, GraphedTextEncoder) and again is not first and again.graphs == {}
        own_engine.config = eager_config
        own_engine.place(resident)
        assert own_engine.prompts.text_encoder is plain
    finally:
        own_engine.config = eager_config
        own_engine.place(resident)
