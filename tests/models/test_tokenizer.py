"""zimage.models.tokenizer.PromptTokenizer against transformers' AutoTokenizer (the reference it replaces).

Folders: the tiny tokenizer of zimage/weights/tiny.py (TokenizersBackend, chat_template.jinja), and a "Qwen-style"
variant of it laid out as the published Qwen3 / Z-Image tokenizer folder is (tokenizer_class Qwen2Tokenizer, so
transformers rebuilds the backend from vocab + merges; NFC + Qwen's split regex + byte-level in tokenizer.json;
the chat template inside tokenizer_config.json; bos/unk null; add_bos_token false).
data/qwen3_chat_template.jinja is Qwen3's chat template (Qwen/Qwen3-4B tokenizer_config.json `chat_template`:
tools, reasoning_content, enable_thinking), as Z-Image's tokenizer ships it.
Everything below is compared for equality (strings, token ids): there is no tolerance.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from zimage.errors import ModelFolderError
from zimage.models.tokenizer import PromptTokenizer

DATA = Path(__file__).parent / "data"
QWEN3_TEMPLATE = (DATA / "qwen3_chat_template.jinja").read_text(encoding="utf-8")
QWEN_SPLIT = (  # Qwen2/3's pre-tokenizer regex (transformers' PRETOKENIZE_REGEX, tokenizer.json's Split)
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LONG = "a detailed photo of a red fox in the snow, cinematic light, " * 40  # ~500+ tokens: truncated below
PROMPTS = [
    "a cat",
    "",
    "Ünïcødé 猫 🐱 café vs cafe\u0301 — “quotes” ½ ﬁ",  # NFC-sensitive text, CJK, emoji, punctuation
    "<|im_end|> inside <think> and </think>",  # special tokens typed by the user
    LONG,
    "  lead\nnew\tline\r\n  trailing  ",
    "it's 1234 dogs!! {{ not jinja }} {% raw %}",
]


def _ref_template(ref, prompt: str) -> str:
    return ref.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


def _assert_same_encode(ref, ours, texts, max_length):
    enc = ref(texts, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = ours.encode(texts, max_length)
    assert ids.dtype == mask.dtype == enc.input_ids.dtype
    assert ids.tolist() == enc.input_ids.tolist()
    assert mask.tolist() == enc.attention_mask.tolist()
    return ids, mask


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from zimage.weights.tiny import build_tokenizer

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_style_dir(tmp_path_factory, tiny_dir) -> Path:
    folder = tmp_path_factory.mktemp("qwen-tok") / "tokenizer"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").unlink()
    tj = json.loads((folder / "tokenizer.json").read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tj["normalizer"] = {"type": "NFC"}
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN_SPLIT}, "behavior": "Isolated", "invert": False}, byte_level,
    ]}
    tj["post_processor"] = dict(byte_level)
    tj["decoder"] = dict(byte_level)
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in fields} for t in tj["added_tokens"]},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN3_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return folder


@pytest.fixture
def broken(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny tokenizer folder, to damage."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_dir, folder)
    return folder


def test_tiny_template_count_encode_match_transformers(tiny_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny_dir)
    ours = PromptTokenizer.from_folder(tiny_dir)
    texts = []
    for p in PROMPTS:
        text = ours.template(p)
        assert text == _ref_template(ref, p)
        assert ours.count_tokens(text) == len(ref(text).input_ids)
        assert ours.count_tokens(p) == len(ref(p).input_ids)
        texts.append(text)
    assert ours.count_tokens(texts[4]) > 300  # LONG is long
    for max_length in (512, 64, 8):
        ids, mask = _assert_same_encode(ref, ours, texts, max_length)
        assert ids.shape[1] == min(max_length, max(ours.count_tokens(t) for t in texts))
        assert mask.sum(1).tolist() == [min(max_length, ours.count_tokens(t)) for t in texts]
    _assert_same_encode(ref, ours, texts[:1], 512)  # a batch of one: no padding
    assert ours.special_tokens == ref.special_tokens_map
    assert ours.pad_token_id == ref.pad_token_id


def test_qwen3_chat_template_matches_transformers(tiny_dir):
    """Qwen3's real template (tools / thinking logic) rendered for user prompts, set on the tiny tokenizer."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny_dir)
    ref.chat_template = QWEN3_TEMPLATE
    base = PromptTokenizer.from_folder(tiny_dir)
    ours = PromptTokenizer(base.tokenizer, QWEN3_TEMPLATE, base.special_tokens, base.pad_token_id)
    assert "enable_thinking" in QWEN3_TEMPLATE and "tools" in QWEN3_TEMPLATE and "reasoning_content" in QWEN3_TEMPLATE
    for p in PROMPTS:
        text = ours.template(p)
        assert text == _ref_template(ref, p)
        # Thinking enabled: the template adds no empty <think></think> block.
        assert text == f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"


def test_qwen_style_folder_matches_transformers(qwen_style_dir):
    """The published layout: Qwen2Tokenizer class, template in tokenizer_config.json, Qwen's pre-tokenizer."""
    from transformers import AutoTokenizer

    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN_SPLIT == PRETOKENIZE_REGEX  # the pipeline transformers rebuilds is the one in our tokenizer.json
    ref = AutoTokenizer.from_pretrained(qwen_style_dir)
    assert type(ref).__name__ == "Qwen2Tokenizer"  # the rebuild-from-vocab path of transformers
    ours = PromptTokenizer.from_folder(qwen_style_dir)
    assert ours.chat_template == QWEN3_TEMPLATE
    assert ours.special_tokens == ref.special_tokens_map
    texts = [ours.template(p) for p in PROMPTS]
    assert texts == [_ref_template(ref, p) for p in PROMPTS]
    for text in texts:
        assert ours.tokenizer.encode(text).ids == ref(text).input_ids
        assert ours.count_tokens(text) == len(ref(text).input_ids)
    for max_length in (512, 40):
        _assert_same_encode(ref, ours, texts, max_length)


def test_qwen2_class_defaults_for_unnamed_special_tokens(qwen_style_dir, tmp_path):
    """A Qwen2Tokenizer config that does not mention unk/bos: transformers' class defaults apply, as ours."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(qwen_style_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["unk_token"], config["bos_token"], config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ref = AutoTokenizer.from_pretrained(folder)
    ours = PromptTokenizer.from_folder(folder)
    assert ours.special_tokens == ref.special_tokens_map
    assert ours.special_tokens["pad_token"] == "<|endoftext|>"
    texts = [ours.template(p) for p in PROMPTS[:3]]
    _assert_same_encode(ref, ours, texts, 512)


def test_post_processor_special_tokens_and_left_truncation(qwen_style_dir, tmp_path):
    """Special tokens added by tokenizer.json's post-processor count in max_length, as in transformers; a
    truncation_side of "left" is honoured."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(qwen_style_dir, folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    start, end = "<|im_start|>", "<|im_end|>"
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": start, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": end, "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in (start, end)},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="TokenizersBackend", truncation_side="left")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ref = AutoTokenizer.from_pretrained(folder)
    ours = PromptTokenizer.from_folder(folder)
    plain = len(ref("a cat", add_special_tokens=False).input_ids)
    assert ours.count_tokens("a cat") == len(ref("a cat").input_ids) == plain + 2
    texts = [ours.template(p) for p in PROMPTS]
    for max_length in (512, 20, 2):
        out, _ = _assert_same_encode(ref, ours, texts, max_length)
        assert out[0, 0].item() == ids[start]


def test_template_features_match_transformers(tiny_dir):
    """The environment transformers gives templates: trim/lstrip blocks, loopcontrols, namespace, tojson without
    HTML escaping, {% generation %}, special-token variables, raise_exception."""
    import jinja2
    from transformers import AutoTokenizer

    template = (
        "{%- set ns = namespace(n=0) %}\n"
        "{% for m in messages %}\n"
        "    {% if loop.index > 3 %}{% break %}{% endif %}\n"
        "    {% set ns.n = ns.n + 1 %}\n"
        "  {{ m | tojson }}|{{ m.content | tojson(indent=1) }}\n"
        "{% generation %}[{{ m.content | trim }}]{% endgeneration %}\n"
        "{% endfor %}\n"
        "n={{ ns.n }} eos={{ eos_token }} pad={{ pad_token }} bos={{ bos_token is defined }}"
        " think={{ enable_thinking }} gen={{ add_generation_prompt }} tools={{ tools is none }}"
        " d={{ dict(a=1) | tojson }} y={{ strftime_now('%Y') | length }}\n"
        "{% if messages[0].content == 'boom' %}{{ raise_exception('no ' + messages[0].content) }}{% endif %}"
    )
    ref = AutoTokenizer.from_pretrained(tiny_dir)
    ref.chat_template = template
    base = PromptTokenizer.from_folder(tiny_dir)
    ours = PromptTokenizer(base.tokenizer, template, base.special_tokens, base.pad_token_id)
    for p in ["<b>&'\"</b> ünï", "  x  ", ""]:
        assert ours.template(p) == _ref_template(ref, p)
    with pytest.raises(jinja2.TemplateError, match="no boom"):
        ours.template("boom")
    with pytest.raises(jinja2.TemplateError, match="no boom"):
        _ref_template(ref, "boom")


def test_template_compiled_once(tiny_dir):
    tok = PromptTokenizer.from_folder(tiny_dir)
    compiled = tok._template
    tok.template("a")
    tok.template("b")
    assert tok._template is compiled


@pytest.mark.parametrize(
    "damage, names",
    [
        (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json"),
        (lambda f: (f / "tokenizer_config.json").unlink(), "tokenizer_config.json"),
        (lambda f: (f / "tokenizer_config.json").write_text("{not json"), "tokenizer_config.json"),
        (lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": 3}'), "tokenizer.json"),
        (lambda f: (f / "tokenizer.json").write_bytes(b"\x00\xff garbage"), "tokenizer.json"),
        (lambda f: (f / "chat_template.jinja").unlink(), "chat_template.jinja"),
        (lambda f: (f / "chat_template.jinja").write_text("{% for m in messages %}"), "chat_template.jinja"),
        (lambda f: (f / "chat_template.jinja").write_text("{{ m | no_such_filter }}"), "chat_template.jinja"),
    ],
)
def test_missing_or_invalid_files_raise_model_folder_error(broken, damage, names):
    damage(broken)
    with pytest.raises(ModelFolderError, match=names):
        PromptTokenizer.from_folder(broken)


def test_template_from_tokenizer_config_and_pad_token_required(broken):
    (broken / "chat_template.jinja").unlink()
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0].content }}!"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    assert PromptTokenizer.from_folder(broken).template("hi") == "hi!"
    config["chat_template"] = "{% if %}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="tokenizer_config.json"):
        PromptTokenizer.from_folder(broken)
    config["chat_template"] = "x"
    del config["pad_token"]
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="pad_token"):
        PromptTokenizer.from_folder(broken)


def test_runtime_path_imports_neither_transformers_nor_diffusers(tiny_dir):
    """Load + template + encode + text encoder forward in a fresh interpreter: no transformers, no diffusers."""
    code = f"""
import sys, torch
from zimage.models.tokenizer import PromptTokenizer
from zimage.models.qwen3 import Qwen3TextEncoder
from zimage.weights.tiny import TINY_TEXT
tok = PromptTokenizer.from_folder({str(tiny_dir)!r})
ids, mask = tok.encode([tok.template("a cat"), tok.template("")], 512)
config = dict(TINY_TEXT, vocab_size=1024, rope_theta=1e6, rms_norm_eps=1e-6)
out = Qwen3TextEncoder(config, 2)(ids, mask)
assert out.shape == (2, ids.shape[1], TINY_TEXT["hidden_size"]), out.shape
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "diffusers", "sklearn"))
assert not bad, bad
print("ok")
"""
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
