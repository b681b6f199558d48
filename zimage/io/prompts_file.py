"""Reading a prompts file: one prompt a line (text), or one JSON object a line (JSONL) with settings per line.

Text: blank lines and lines starting with '#' are skipped.
JSONL: {"prompt": "...", "negative_prompt", "width", "height", "aspect", "steps", "guidance", "seed", "n", "output"}
(all but prompt optional; the CLI's flags give the defaults). Errors name the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import UsageError

JSONL_KEYS = {"prompt", "negative_prompt", "width", "height", "aspect", "steps", "guidance", "seed", "n", "output"}


@dataclass(frozen=True)
class PromptLine:
    line: int  # 1-based line number in the file
    settings: dict  # at least {"prompt": str}


def read_prompts_file(path: Path) -> list[PromptLine]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM (Windows editors) is not part of line 1
    except FileNotFoundError:
        raise UsageError(f"prompts file {path} does not exist", param="prompts_file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"prompts file {path} cannot be read: {e}", param="prompts_file") from None
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    out = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        if jsonl or line.startswith("{"):
            out.append(PromptLine(number, _parse_json_line(path, number, line)))
        else:
            out.append(PromptLine(number, {"prompt": line}))
    if not out:
        raise UsageError(f"prompts file {path} has no prompts", param="prompts_file")
    return out


def _parse_json_line(path: Path, number: int, line: str) -> dict:
    where = f"{path}:{number}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not valid JSON ({e.msg} at column {e.colno})", param="prompts_file") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}", param="prompts_file")
    unknown = set(obj) - JSONL_KEYS
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(JSONL_KEYS))}",
            param="prompts_file",
        )
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
        raise UsageError(f"{where}: \"prompt\" is missing or empty", param="prompts_file")
    return obj
