"""Choosing output file names: explicit names are never overwritten (unless asked), automatic names take the
next free number. All names are planned and checked before the model loads, so a bad output fails fast; planning
creates nothing (folders are made when their first image is saved)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from zimage.errors import UsageError, WriteError


def slug(prompt: str, length: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", prompt).strip("-").lower()
    return s[:length].rstrip("-") or "image"


def is_directory_target(output: str) -> bool:
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def check_writable_folder(folder: Path, may_create: bool) -> None:
    """A UsageError unless images can be written in `folder`. Planning writes nothing: a folder that does not exist
    yet (and may be created) is checked at its nearest existing parent, and made by create_folder when its first
    image is saved, so that a bad input found later in the planning leaves no empty folder behind."""
    if not folder.exists():
        if not may_create:
            raise UsageError(f"output folder {folder} does not exist", param="output")
        parent = folder.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"output folder {folder} cannot be created: {parent} is not a folder", param="output")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"output folder {folder} cannot be created: {parent} is not writable", param="output")
        return
    if not folder.is_dir():
        raise UsageError(f"output folder {folder} is not a folder", param="output")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"output folder {folder} is not writable", param="output")


def create_folder(folder: Path) -> None:
    """Make a planned output folder (and its parents) just before an image is saved in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"output folder {folder} cannot be created: {e.strerror or e}") from None


class OutputPlanner:
    """Hands out paths; remembers those already handed out in this run."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.taken: set[Path] = set()

    def plan(self, output: str, prompts: list[str], seeds: list[int]) -> list[Path]:
        """Paths for len(seeds) images. `output` is a .png file (several images: name-1.png, name-2.png, ...)
        or a folder (names from prompt and seed)."""
        if is_directory_target(output):
            folder = Path(output)
            check_writable_folder(folder, may_create=True)
            return [self._free(folder / f"{slug(p)}-{s}.png") for p, s in zip(prompts, seeds)]
        path = Path(output)
        if path.suffix.lower() != ".png":
            raise UsageError(f"--output {output!r} must end in .png (or be a folder, ending in /)", param="output")
        check_writable_folder(path.parent if str(path.parent) else Path("."), may_create=False)
        if len(seeds) == 1:
            paths = [path]
        else:
            paths = [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(len(seeds))]
        for p in paths:
            if p in self.taken:
                raise UsageError(f"{p} would be written twice in this run; give each prompt its own output", param="output")
            if p.exists() and not self.overwrite:
                raise UsageError(f"{p} exists; pass --overwrite to replace it, or choose another --output", param="output")
            self.taken.add(p)
        return paths

    def _free(self, path: Path) -> Path:
        candidate, i = path, 1
        while candidate in self.taken or (candidate.exists() and not self.overwrite):
            candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
            i += 1
        self.taken.add(candidate)
        return candidate
