"""Prompts files: text (one prompt a line) and JSONL (settings per line); errors name the file and the line."""

from __future__ import annotations

import pytest

from zimage.errors import UsageError
from zimage.io.prompts_file import read_prompts_file


def write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_text(text, encoding=encoding)
    return p


def test_text_file(tmp_path):
    p = write(tmp_path, "p.txt", "a cat\n\n# comment\n   a dog in the rain  \r\n#another\nlast line")
    lines = read_prompts_file(p)
    assert [(x.line, x.settings) for x in lines] == [
        (1, {"prompt": "a cat"}), (4, {"prompt": "a dog in the rain"}), (6, {"prompt": "last line"})]


def test_text_file_with_json_lines(tmp_path):
    p = write(tmp_path, "p.txt", 'plain\n{"prompt": "json", "seed": 3}\n')
    assert [x.settings for x in read_prompts_file(p)] == [{"prompt": "plain"}, {"prompt": "json", "seed": 3}]


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson", ".JSONL"])
def test_jsonl(tmp_path, suffix):
    p = write(tmp_path, "p" + suffix, '{"prompt": "a", "width": 512, "height": 768, "steps": 4}\n\n'
                                      '{"prompt": "b", "aspect": "16:9", "n": 2, "output": "x/"}\n')
    lines = read_prompts_file(p)
    assert [x.line for x in lines] == [1, 3]
    assert lines[0].settings == {"prompt": "a", "width": 512, "height": 768, "steps": 4}
    assert lines[1].settings["aspect"] == "16:9" and lines[1].settings["output"] == "x/"


def test_utf8_bom_is_not_part_of_the_first_prompt(tmp_path):
    p = write(tmp_path, "p.txt", "a cat\nb\n", encoding="utf-8-sig")
    assert read_prompts_file(p)[0].settings == {"prompt": "a cat"}
    p = write(tmp_path, "p.jsonl", '{"prompt": "a cat"}\n', encoding="utf-8-sig")
    assert read_prompts_file(p)[0].settings == {"prompt": "a cat"}


@pytest.mark.parametrize("text, expect", [
    ('{"prompt": "a"}\n{"prompt": \n', ":2: not valid JSON"),
    ('{"prompt": "a"}\n\n\n[1, 2]\n', ":4: expected a JSON object, got list"),
    ('{"prompt": "a", "sampler": "x", "cfg": 1}\n', ":1: unknown key(s) cfg, sampler; allowed:"),
    ('{"seed": 1}\n', ':1: "prompt" is missing or empty'),
    ('{"prompt": 5}\n', ':1: "prompt" is missing or empty'),
    ('{"prompt": " "}\n', ':1: "prompt" is missing or empty'),
    ("# a comment is not JSON\n", ":1: not valid JSON"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, text, expect):
    p = write(tmp_path, "p.jsonl", text)
    with pytest.raises(UsageError) as info:
        read_prompts_file(p)
    assert f"{p}{expect}" in str(info.value) and info.value.param == "prompts_file"


def test_empty_file(tmp_path):
    p = write(tmp_path, "p.txt", "\n  \n# nothing\n")
    with pytest.raises(UsageError, match="has no prompts") as info:
        read_prompts_file(p)
    assert str(p) in str(info.value)


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_prompts_file(tmp_path / "nope.txt")
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match="cannot be read") as info:
        read_prompts_file(p)
    assert str(p) in str(info.value)
