"""The prompt tokenizer of Z-Image (Qwen3's), without transformers: `tokenizers` + a jinja2 chat template.

Replaces `transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")` for the three things the pipeline does
with it, with the same results:

    tok = PromptTokenizer.from_folder(folder / "tokenizer")
    text = tok.template(prompt)  # == apply_chat_template([user prompt], tokenize=False,
                                 #       add_generation_prompt=True, enable_thinking=True)
    n = tok.count_tokens(text)  # == len(AutoTokenizer(text).input_ids)
    ids, mask = tok.encode(texts, max_length)  # == AutoTokenizer(texts, padding="longest",
                                                #       max_length=max_length, truncation=True, return_tensors="pt")

Sources reproduced (transformers 5.x): utils/chat_template_utils.py (the sandboxed jinja environment and its
globals, render_jinja_template), tokenization_utils_base.py (apply_chat_template, special_tokens_map, the
chat_template.jinja file; add_bos_token / add_eos_token are ignored when there is a tokenizer.json, so its
post-processor decides the special tokens) and tokenization_utils_tokenizers.py (TokenizersBackend: special tokens
added on load, truncation then padding).
transformers' Qwen2Tokenizer rebuilds the backend from tokenizer.json's vocab and merges with a hard-coded
pipeline (NFC, Qwen's split regex, byte-level); that pipeline is the one Qwen's tokenizer.json holds, so reading
tokenizer.json as is gives the same tokens.
Padding is always on the right (what zimage.models.qwen3 needs); a `padding_side` in tokenizer_config.json is
ignored. `truncation_side` is honoured, as transformers does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from zimage.errors import ModelFolderError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"

# transformers' PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES: the variables a chat template sees.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# What transformers' Qwen2Tokenizer uses for a special token that tokenizer_config.json does not mention at all.
_CLASS_DEFAULTS = {
    "Qwen2Tokenizer": {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
}
_CLASS_DEFAULTS["Qwen2TokenizerFast"] = _CLASS_DEFAULTS["Qwen2Tokenizer"]


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, null, or a serialized AddedToken object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"not a token: {value!r}")


def compile_chat_template(source: str):
    """A jinja2 Template compiled as transformers compiles chat templates (`_compile_jinja_template`).

    ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks) with the loopcontrols extension, a `{% generation %}`
    block tag (renders its body, as transformers' AssistantTracker does when not tracking), the `tojson` filter
    that does not escape HTML, `raise_exception`, `strftime_now`, and transformers' restricted `dict` and
    `namespace` globals.
    """
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


class PromptTokenizer:
    """A tokenizer folder's tokenizer.json + chat template, for the prompts of one text encoder."""

    def __init__(self, tokenizer, chat_template: str, special_tokens: dict[str, str], pad_token_id: int,
                 truncation_side: str = "right", template_file: str = "chat template"):
        import jinja2

        self.tokenizer = tokenizer  # tokenizers.Tokenizer, no truncation or padding enabled
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)  # e.g. {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        self.pad_token_id = pad_token_id
        self.truncation_side = truncation_side
        try:
            self._template = compile_chat_template(chat_template)  # compiled once
        except jinja2.TemplateError as e:  # a syntax error, an unknown tag or filter
            raise ModelFolderError(f"{template_file} is not a valid chat template: {type(e).__name__}: {e}") from None

    @classmethod
    def from_folder(cls, path) -> PromptTokenizer:
        """Load tokenizer.json, tokenizer_config.json and the chat template (chat_template.jinja when present,
        as transformers prefers it, else `chat_template` in tokenizer_config.json)."""
        from tokenizers import AddedToken, Tokenizer

        folder = Path(path)
        tok_path, config_path, template_path = folder / TOKENIZER_FILE, folder / CONFIG_FILE, folder / TEMPLATE_FILE
        if not tok_path.is_file():
            raise ModelFolderError(f"{tok_path} is missing")
        if not config_path.is_file():
            raise ModelFolderError(f"{config_path} is missing")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFolderError(f"{config_path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ModelFolderError(f"{config_path} is not a JSON object")
        try:
            tokenizer = Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or an unknown component
            raise ModelFolderError(f"{tok_path} is not a valid tokenizers file: {e}") from None

        # The chat template: the .jinja file wins over tokenizer_config.json (transformers' from_pretrained).
        if template_path.is_file():
            try:
                template, template_file = template_path.read_text(encoding="utf-8"), str(template_path)
            except (OSError, UnicodeDecodeError) as e:
                raise ModelFolderError(f"{template_path} cannot be read: {e}") from None
        else:
            template, template_file = config.get("chat_template"), str(config_path)
            if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}], "default" is used
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if template is None:
                raise ModelFolderError(
                    f"{folder} has no chat template (no {TEMPLATE_FILE}, no chat_template in {CONFIG_FILE})"
                )
        if not isinstance(template, str):
            raise ModelFolderError(f"the chat template in {template_file} is not a string")

        # Named special tokens, as transformers' special_tokens_map (null -> absent; class defaults when unnamed).
        special: dict[str, str] = {}
        defaults = _CLASS_DEFAULTS.get(config.get("tokenizer_class"), {})
        try:
            for name in SPECIAL_TOKEN_NAMES:
                value = _token_content(config[name] if name in config else defaults.get(name))
                if value is not None:
                    special[name] = value
            extra = []
            for key in ("additional_special_tokens", "extra_special_tokens"):
                more = config.get(key) or []
                extra += [_token_content(t) for t in (more.values() if isinstance(more, dict) else more)]
        except ValueError as e:
            raise ModelFolderError(f"{config_path} has a bad special token: {e}") from None
        truncation_side = config.get("truncation_side", "right")
        if truncation_side not in ("right", "left"):
            raise ModelFolderError(f"{config_path} has truncation_side={truncation_side!r} (right or left)")

        # Tokens transformers adds on load when tokenizer.json lacks them as added tokens (normally none).
        present = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        decoder = config.get("added_tokens_decoder") or {}
        missing = []
        for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else -1):
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"] not in present:
                fields = ("single_word", "lstrip", "rstrip", "normalized", "special")
                missing.append(AddedToken(entry["content"], **{k: bool(entry[k]) for k in fields if k in entry}))
                present.add(entry["content"])
        for content in [*special.values(), *[t for t in extra if t]]:
            if content not in present:
                missing.append(AddedToken(content, special=True, normalized=False))
                present.add(content)
        if missing:
            tokenizer.add_tokens(missing)
        tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
        tokenizer.no_truncation()
        tokenizer.no_padding()

        pad = special.get("pad_token")
        if pad is None:
            raise ModelFolderError(f"{config_path} names no pad_token (needed to pad a batch of prompts)")
        pad_id = tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ModelFolderError(f"{config_path}: pad_token {pad!r} is not in {tok_path}")
        return cls(tokenizer, template, special, pad_id, truncation_side, template_file)

    def template(self, prompt: str) -> str:
        """The prompt as one user turn + the generation prompt, thinking enabled (Z-Image's reference)."""
        # Same variables, in the same precedence, as transformers' apply_chat_template -> render_jinja_template.
        variables = {**self.special_tokens, "enable_thinking": True}
        return self._template.render(
            messages=[{"role": "user", "content": prompt}], tools=None, documents=None, add_generation_prompt=True,
            **variables,
        )

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` with the special tokens the post-processor adds, never truncated."""
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def encode(self, texts: list[str], max_length: int):
        """(input_ids, attention_mask), both LongTensor (B, L_max): each text truncated to `max_length` tokens
        (special tokens included), right-padded with the pad token to the longest of the batch."""
        import torch

        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        post = self.tokenizer.post_processor
        n_special = post.num_special_tokens_to_add(False) if post is not None else 0
        room = max_length - n_special  # as tokenizers' own truncation: the content gets what the specials leave
        if room < 0:
            raise ValueError(f"max_length={max_length} leaves no room next to {n_special} special tokens")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = []
        for enc in encodings:
            if len(enc.ids) > room:
                enc.truncate(room, direction=self.truncation_side)
            rows.append(self.tokenizer.post_process(enc, add_special_tokens=True).ids)
        longest = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)  # (B, L_max)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, L_max)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask
