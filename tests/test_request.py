"""Every bad-input rule of GenerateRequest and sizes: a UsageError that names the value, the rule and the param."""

from __future__ import annotations

import pytest

from zimage.errors import UsageError
from zimage.request import (MAX_IMAGES_PER_PROMPT, MAX_IMAGES_PER_REQUEST, MAX_PROMPTS, MAX_STEPS, GenerateRequest)
from zimage.sizes import ASPECT_PRESETS, MAX_SIDE, MIN_SIDE, check_side, parse_size, size_for_aspect

OK = dict(prompts=("a cat",), width=256, height=256, steps=2, seed=1)


def bad(**changes) -> UsageError:
    with pytest.raises(UsageError) as info:
        GenerateRequest(**{**OK, **changes})
    return info.value


def test_valid_request_and_defaults():
    from zimage.recipe import BASE, TURBO

    r = GenerateRequest(prompts=("a cat",))
    assert (r.width, r.height, r.steps, r.guidance, r.n) == (1024, 1024, None, None, 1)  # the model's recipe decides
    t, b = r.with_recipe(TURBO), r.with_recipe(BASE)
    assert (t.steps, t.guidance, t.cfg, b.steps, b.guidance, b.cfg) == (8, 0.0, False, 50, 4.0, True)
    given = GenerateRequest(prompts=("a cat",), steps=3, guidance=0)
    assert given.with_recipe(BASE) is given  # what the caller set stays
    assert isinstance(r.seed, int) and 0 <= r.seed < 2**32
    assert not r.cfg
    assert GenerateRequest(prompts="one string").prompts == ("one string",)
    assert GenerateRequest(**{**OK, "guidance": 4}).guidance == 4.0 and GenerateRequest(**{**OK, "guidance": 4}).cfg


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_or_whitespace_prompt(prompt):
    e = bad(prompts=(prompt,))
    assert e.param == "prompt"
    assert "prompt is empty" in str(e)


def test_empty_prompt_in_a_batch_names_which():
    e = bad(prompts=("ok", "  "))
    assert e.param == "prompt" and "prompt 2 is empty" in str(e)


def test_no_prompts_and_too_many():
    assert bad(prompts=()).param == "prompt"
    e = bad(prompts=("x",) * (MAX_PROMPTS + 1))
    assert e.param == "prompt" and f"at most {MAX_PROMPTS}" in str(e) and str(MAX_PROMPTS + 1) in str(e)


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize("value, rule", [
    (500, "multiple of 16"),
    (257, "multiple of 16"),
    (240, f"between {MIN_SIDE} and {MAX_SIDE}"),
    (0, f"between {MIN_SIDE} and {MAX_SIDE}"),
    (-16, f"between {MIN_SIDE} and {MAX_SIDE}"),
    (2064, f"between {MIN_SIDE} and {MAX_SIDE}"),
    (4096, f"between {MIN_SIDE} and {MAX_SIDE}"),
])
def test_bad_sides(side, value, rule):
    e = bad(**{side: value})
    assert e.param == side
    msg = str(e)
    assert msg.startswith(side) and rule in msg and f"got {value}" in msg


def test_multiple_of_16_suggests_neighbours():
    assert "(nearest: 496 or 512)" in str(bad(width=500))


def test_side_limits_are_inclusive():
    assert check_side("width", MIN_SIDE) == MIN_SIDE and check_side("width", MAX_SIDE) == MAX_SIDE


@pytest.mark.parametrize("value", [256.0, "256", True])
def test_side_must_be_an_integer(value):
    e = bad(width=value)
    assert e.param == "width" and "must be an integer" in str(e) and repr(value) in str(e)


def test_an_unset_side_is_the_default_size_without_an_input_image():
    r = GenerateRequest(prompts=("a cat",), width=None, height=512)
    assert (r.width, r.height) == (1024, 512)


@pytest.mark.parametrize("steps", [0, -1, -50, MAX_STEPS + 1, 10_000])
def test_bad_steps(steps):
    e = bad(steps=steps)
    assert e.param == "steps"
    assert f"steps must be between 1 and {MAX_STEPS}, got {steps}" == str(e)


def test_steps_limits_inclusive():
    assert GenerateRequest(**{**OK, "steps": 1}).steps == 1
    assert GenerateRequest(**{**OK, "steps": MAX_STEPS}).steps == MAX_STEPS


@pytest.mark.parametrize("guidance", [-0.5, -1, -100.0])
def test_negative_guidance(guidance):
    e = bad(guidance=guidance)
    assert e.param == "guidance"
    assert "guidance must be between 0 and" in str(e) and f"got {guidance}" in str(e)


@pytest.mark.parametrize("guidance", [float("nan"), float("inf"), "4", True])
def test_guidance_not_a_finite_number(guidance):
    e = bad(guidance=guidance)
    assert e.param == "guidance" and "guidance must be a number" in str(e) and repr(guidance) in str(e)


def test_guidance_above_limit():
    e = bad(guidance=31.0)
    assert e.param == "guidance" and "got 31.0" in str(e)


@pytest.mark.parametrize("n", [0, -1, MAX_IMAGES_PER_PROMPT + 1])
def test_bad_n(n):
    e = bad(n=n)
    assert e.param == "n"
    assert f"n must be between 1 and {MAX_IMAGES_PER_PROMPT}, got {n}" == str(e)


def test_too_many_images_per_request():
    count = MAX_IMAGES_PER_REQUEST // MAX_IMAGES_PER_PROMPT + 1
    e = bad(prompts=("x",) * count, n=MAX_IMAGES_PER_PROMPT)
    assert e.param == "n" and str(count * MAX_IMAGES_PER_PROMPT) in str(e) and str(MAX_IMAGES_PER_REQUEST) in str(e)


@pytest.mark.parametrize("seed", [-1, 2**63, "7", 1.5])
def test_bad_seed(seed):
    e = bad(seed=seed)
    assert e.param == "seed" and "seed must be" in str(e)


def test_negative_prompt_must_be_text():
    e = bad(negative_prompt=3)
    assert e.param == "negative_prompt" and "3" in str(e)


def test_prompt_too_long_in_characters():
    from zimage.request import MAX_PROMPT_CHARS

    e = bad(prompts=("x" * (MAX_PROMPT_CHARS + 1),))
    assert e.param == "prompt" and str(MAX_PROMPT_CHARS + 1) in str(e) and str(MAX_PROMPT_CHARS) in str(e)


@pytest.mark.parametrize("aspect", ["5:4", "16x9", "", "1:1 ", "square"])
def test_unknown_aspect(aspect):
    with pytest.raises(UsageError) as info:
        size_for_aspect(aspect)
    e = info.value
    assert e.param == "aspect"
    assert f"unknown aspect {aspect!r}" in str(e)
    for known in ASPECT_PRESETS:
        assert known in str(e)


def test_aspect_presets_are_valid_sizes_and_match_their_ratio():
    expected = {"1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9", "9:21"}
    assert set(ASPECT_PRESETS) == expected
    for aspect, (w, h) in ASPECT_PRESETS.items():
        check_side("width", w), check_side("height", h)
        a, b = (int(x) for x in aspect.split(":"))
        assert abs(w / h - a / b) < 0.06, aspect
        assert 0.75e6 < w * h < 1.2e6, aspect  # the ~1 MP buckets
    assert size_for_aspect("16:9") == (1280, 720)


def test_parse_size():
    assert parse_size("512x768") == (512, 768)
    assert parse_size("512X768") == (512, 768)
    with pytest.raises(UsageError, match="WIDTHxHEIGHT.*'512'") as info:
        parse_size("512")
    assert info.value.param == "size"
    with pytest.raises(UsageError, match="height must be a multiple of 16, got 770"):
        parse_size("512x770")


# Text that cannot be encoded as UTF-8: on Linux, command-line bytes that are not UTF-8 arrive as lone surrogates
# (surrogateescape); JSON can spell one too ("\udcff"). The tokenizer and the PNG writer fail on them after the
# model has loaded, so the request refuses them, naming the prompt and the character's position.
@pytest.mark.parametrize("changes, where, position, char", [
    (dict(prompts=("\udcff\udcfe cat",)), "prompt", 1, "'\\udcff'"),
    (dict(prompts=("a cat \ud83d",)), "prompt", 7, "'\\ud83d'"),
    (dict(prompts=("a cat", "a d\udc80g")), "prompt 2", 4, "'\\udc80'"),
    (dict(negative_prompt="blur\udcffry", guidance=2.0), "negative prompt", 5, "'\\udcff'"),
    (dict(negative_prompt="blur\udcffry"), "negative prompt", 5, "'\\udcff'"),  # ignored at guidance 0, still text
])
def test_text_that_is_not_utf8_is_refused(changes, where, position, char):
    e = bad(**changes)
    message = str(e)
    assert message.startswith(f"{where} cannot be encoded as UTF-8: character {position} is {char}"), message
    assert e.param == ("negative_prompt" if where == "negative prompt" else "prompt")
    message.encode("utf-8")  # the message itself is printable


def test_non_ascii_text_is_fine():
    r = GenerateRequest(**{**OK, "prompts": ("un café, «neon» 猫 🐈",), "negative_prompt": "flou"})
    assert r.prompts == ("un café, «neon» 猫 🐈",)


def test_negative_prompt_ignored_without_guidance():
    assert GenerateRequest(**{**OK, "negative_prompt": "blurry"}).negative_prompt_ignored
    assert not GenerateRequest(**{**OK, "negative_prompt": "blurry", "guidance": 1.0}).negative_prompt_ignored
    assert not GenerateRequest(**{**OK, "negative_prompt": "  "}).negative_prompt_ignored
    assert not GenerateRequest(**OK).negative_prompt_ignored
