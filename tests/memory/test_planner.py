"""The planner over the published sizes: each budget gets the plan kind it should, and every plan it returns fits."""

from __future__ import annotations

import pytest

from zimage.errors import UsageError
from zimage.memory.plan import GIB, spread
from zimage.memory.planner import choose_plan, fits, headroom, leanest_plan, make_plan, minimum_budget


def test_published_sizes_match_the_model(published_sizes):
    s = published_sizes
    assert len(s.transformer.blocks) == 30 and len(s.text_encoder.blocks) == 35  # the last text layer is cut
    assert 11.3 * GIB < s.transformer.total < 11.6 * GIB  # 6.15B params in bf16 = 12.3 GB
    assert 7.0 * GIB < s.text_encoder.total < 7.5 * GIB  # ~7.7 GB incl. embeddings
    assert 0.65 * GIB < s.text_embeddings < 0.8 * GIB
    assert s.vae.total < 0.2 * GIB
    assert sum(s.transformer.blocks_fp8) < 0.55 * sum(s.transformer.blocks)  # matrices at 1 byte


# budget GiB -> (kind prefix, transformer streamed: (min, max))
TABLE = {
    80: ("resident", (0, 0)),
    24: ("resident", (0, 0)),
    16: ("text-offload", (0, 0)),
    12: ("stream", (1, 15)),
    8: ("stream", (10, 25)),
    6: ("stream", (15, 29)),
    4: ("stream", (25, 30)),
}


@pytest.mark.parametrize("budget", sorted(TABLE, reverse=True))
def test_budget_table(published_sizes, budget):
    plan = choose_plan(int(budget * GIB), published_sizes, 1024, 1024, 1)
    kind, (lo, hi) = TABLE[budget]
    assert plan.kind.startswith(kind), plan.describe()
    assert lo <= plan.transformer_streamed <= hi, plan.describe()
    assert fits(plan) and plan.peak_bytes + headroom(plan.budget_bytes) <= budget * GIB
    assert plan.peak_bytes == max(b for _, b in plan.phase_peaks)
    if kind == "text-offload":
        assert 0 < plan.text_resident_layers < 35 and plan.moved_per_image == 0  # a repeated prompt moves nothing
    if kind == "resident":
        assert plan.moved_per_image == plan.moved_per_new_prompt == 0 and not plan.tiled_decode


def test_leaner_budgets_never_stream_less(published_sizes):
    streamed = [choose_plan(int(b * GIB), published_sizes).transformer_streamed for b in (24, 16, 12, 10, 8, 6, 5, 4)]
    assert streamed == sorted(streamed)


def test_as_few_blocks_streamed_as_needed(published_sizes):
    """One block fewer streamed (same other choices) would not fit: the planner streams the minimum."""
    plan = choose_plan(int(12 * GIB), published_sizes)
    fewer = make_plan(published_sizes, plan.budget_bytes, 1024, 1024, 1, plan.transformer_streamed - 1, 0, True,
                      plan.tiled_decode, False)
    assert not fits(fewer)


def test_too_small_names_the_minimum(published_sizes):
    need = minimum_budget(leanest_plan(published_sizes, 1024, 1024))
    with pytest.raises(UsageError, match=rf"at least {need / GIB:.2f} GiB") as e:
        choose_plan(int(need - GIB // 4), published_sizes)
    assert e.value.param == "vram_budget" and "1024x1024" in str(e.value)
    assert fits(choose_plan(need, published_sizes))  # ... and the minimum it names is enough


def test_fp8_only_when_asked_for_and_then_always(published_sizes):
    need = minimum_budget(leanest_plan(published_sizes, 1024, 1024))
    with pytest.raises(UsageError):
        choose_plan(need - 1, published_sizes)
    plan = choose_plan(need - 1, published_sizes, fp8=True)
    assert plan.weight_dtype == "fp8" and plan.kind.endswith("+fp8")
    assert choose_plan(int(80 * GIB), published_sizes).weight_dtype == "bf16"  # lossless unless asked
    assert choose_plan(int(80 * GIB), published_sizes, fp8=True).weight_dtype == "fp8"  # the user's choice holds
    # fp8 storage halves the transformer: 12 GiB then holds it resident (bf16 must stream part of it)
    assert choose_plan(int(12 * GIB), published_sizes).transformer_streamed > 0
    assert choose_plan(int(12 * GIB), published_sizes, fp8=True).transformer_streamed == 0


def test_bigger_images_need_more(published_sizes):
    small = choose_plan(int(12 * GIB), published_sizes, 512, 512)
    big = choose_plan(int(12 * GIB), published_sizes, 2048, 2048)
    assert small.transformer_streamed <= big.transformer_streamed
    assert make_plan(published_sizes, 0, 2048, 2048, 1, 0, 35, False, True, False).peak_bytes < \
        make_plan(published_sizes, 0, 2048, 2048, 1, 0, 35, False, False, False).peak_bytes  # tiling saves


def test_nonpositive_budget_is_an_error(published_sizes):
    with pytest.raises(UsageError, match="positive"):
        choose_plan(0, published_sizes)


def test_spread():
    assert spread(0, 30) == []
    assert spread(3, 9) == [2, 5, 8]
    assert spread(30, 30) == list(range(30))
    picks = spread(7, 30)
    assert len(set(picks)) == 7 and all(0 <= i < 30 for i in picks)
    with pytest.raises(ValueError):
        spread(31, 30)


def test_batch_limit_is_the_largest_batch_the_placement_fits(published_sizes):
    from zimage.memory.planner import choose_plan, fits, largest_batch, same_placement

    plan = choose_plan(24 * 2**30, published_sizes)  # a 24 GiB card at 1024x1024
    n = largest_batch(plan, published_sizes, 1024, 1024, 16)
    assert 1 <= n < 16
    assert fits(same_placement(plan, published_sizes, 1024, 1024, n))
    assert not fits(same_placement(plan, published_sizes, 1024, 1024, n + 1))
    big = choose_plan(140 * 2**30, published_sizes)
    assert largest_batch(big, published_sizes, 1024, 1024, 8) == 8
