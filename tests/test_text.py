"""Prompt encoding: the 512-token limit (a warning that counts the dropped tokens), the prompt cache, and equality
with the reference pipeline's caption embeddings."""

from __future__ import annotations

import logging

import torch

from zimage.engine.text import PromptEncoder
from zimage.request import GenerateRequest

LONG = " ".join(["a red fox in the snow at sunset, cinematic"] * 80)


def n_tokens(engine, prompt: str) -> int:
    """Token count with the chat template, computed here independently of PromptEncoder (by transformers)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(engine.location.path / "tokenizer")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)
    return len(tok(text).input_ids)


def encoder(engine, max_tokens=512, cache_size=32) -> PromptEncoder:
    return PromptEncoder(engine.prompts.tokenizer, engine.text_encoder, engine.device, max_tokens, cache_size)


def test_long_prompt_warns_with_the_number_dropped(engine, caplog):
    total = n_tokens(engine, LONG)
    assert total > 512
    req = GenerateRequest(prompts=(LONG,), width=256, height=256, steps=1, seed=1)
    with caplog.at_level(logging.WARNING, logger="zimage"):
        result = engine.generate(req)
    expected = (f"prompt 1 is {total} tokens long (with the chat template); the text encoder reads at most 512, "
                f"so the last {total - 512} tokens were dropped")
    assert result.warnings == [expected]
    assert expected in caplog.text
    assert len(result.images) == 1
    assert engine.prompts.encode([LONG])[0].shape[0] == 512  # really truncated to the limit


def test_short_prompt_no_warning(engine):
    assert engine.prompts.truncation_warnings(["a cat"]) == []


def test_small_limit_counts_exactly(engine):
    enc = encoder(engine, max_tokens=20)
    prompt = "a cat on a red and golden castle tower"
    total = n_tokens(engine, prompt)
    assert total > 20
    (warning,) = enc.truncation_warnings([prompt])
    assert f"is {total} tokens long" in warning and f"the last {total - 20} tokens were dropped" in warning
    assert enc.encode([prompt])[0].shape == (20, engine.text_encoder.hidden_size)
    assert enc.truncation_warnings(["cat"]) == []


def test_truncated_embedding_equals_the_first_tokens(engine):
    """Truncation keeps the first max_tokens tokens: the encoder is causal, so they equal the full prompt's first
    rows."""
    prompt = "a cat on a red and golden castle tower"
    full = encoder(engine).encode([prompt])[0]
    cut = encoder(engine, max_tokens=12).encode([prompt])[0]
    assert torch.allclose(cut, full[:12], atol=1e-5)


def test_embeddings_equal_the_reference(engine, reference_pipeline):
    prompts = ["cat", "a golden castle on a mountain at sunset"]
    ours = encoder(engine).encode(prompts)
    with torch.no_grad():
        ref = reference_pipeline._encode_prompt(list(prompts), device=torch.device("cpu"))
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5


def test_cache_hits_and_misses(engine):
    enc = encoder(engine, cache_size=32)
    first = enc.encode(["a", "b", "a"])
    assert (enc.misses, enc.hits) == (2, 1)
    assert first[0] is first[2]
    again = enc.encode(["b"])
    assert (enc.misses, enc.hits) == (2, 2)
    assert again[0] is first[1]  # served from the cache, not recomputed
    assert enc.cached("a") and not enc.cached("c")
    enc.clear_cache()
    assert not enc.cached("a")
    enc.encode(["a"])
    assert enc.misses == 3


def test_cache_evicts_least_recently_used(engine):
    enc = encoder(engine, cache_size=2)
    enc.encode(["a"]), enc.encode(["b"]), enc.encode(["a"]), enc.encode(["c"])  # b is the oldest use
    assert enc.cached("a") and enc.cached("c") and not enc.cached("b")


def test_more_new_prompts_than_the_cache_holds(engine):
    """One call with more distinct prompts than cache_size (64 prompts per request vs 32 cached) still returns all."""
    enc = encoder(engine, cache_size=2)
    prompts = ["a", "b", "c", "d", "a"]
    out = enc.encode(prompts)
    ref = encoder(engine).encode(prompts)
    assert len(out) == 5
    for x, y in zip(out, ref):
        assert torch.equal(x, y)


def test_engine_prompt_cache_across_generates(engine):
    req = GenerateRequest(prompts=("a unique prompt for the cache test",), width=256, height=256, steps=1, seed=1)
    engine.generate(req)
    hits, misses = engine.prompts.hits, engine.prompts.misses
    engine.generate(req)
    assert (engine.prompts.hits, engine.prompts.misses) == (hits + 1, misses)


def test_cached_prompt_evicted_by_the_same_call_is_still_returned(engine):
    """A batch mixing an old cached prompt with enough new ones to evict it (the server's load test hit this)."""
    from zimage.engine.text import PromptEncoder

    enc = PromptEncoder(engine.prompts.tokenizer, engine.prompts.text_encoder, engine.device, cache_size=2)
    old = enc.encode(["old prompt"])[0]
    out = enc.encode(["old prompt", "new one", "new two"])
    assert len(out) == 3
    assert torch.equal(out[0], old)
    assert not enc.cached("old prompt") or len(enc._cache) <= 2
