"""Reading safetensors headers (without the data) and listing a component's shard files.

A safetensors file is: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}}, then the data. The file size must be exactly 8 + N + max(end): a smaller file
was truncated (an interrupted download), which we report by name before any long work starts.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import ModelFolderError


# safetensors dtype tag -> (torch dtype name: getattr(torch, name), bytes per element)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype tag: "F32", "BF16", "F16", "F8_E4M3", ...
    shape: tuple[int, ...]
    file: Path
    begin: int = 0  # byte offset of the tensor's data in `file` (from the start of the file)
    end: int = 0  # one past its last byte


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> info for one file; ModelFolderError if the file is truncated or not safetensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelFolderError(f"{path} is truncated ({size} bytes): not a complete safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or 8 + n > size:
                raise ModelFolderError(f"{path} is truncated or not a safetensors file (header says {n} bytes)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} cannot be read as safetensors: {e}") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if size < 8 + n + end:
        raise ModelFolderError(
            f"{path} is truncated: {size} bytes, expected {8 + n + end} (an interrupted download? fetch it again)"
        )
    data = 8 + n  # the data section starts after the length and the JSON header
    return {k: TensorInfo(v["dtype"], tuple(v["shape"]), path, data + v["data_offsets"][0], data + v["data_offsets"][1])
            for k, v in header.items()}


def shard_files(folder: Path, stem: str) -> list[Path]:
    """The safetensors files of a component: from `{stem}.safetensors.index.json`, or the single file."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelFolderError(f"{index} is not a valid safetensors index: {e}") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelFolderError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    if single.is_file():
        return [single]
    raise ModelFolderError(f"{folder} has no weights ({single.name} or {index.name})")


def read_component_headers(folder: Path, stem: str) -> dict[str, TensorInfo]:
    """All tensors of a component across its shards."""
    infos: dict[str, TensorInfo] = {}
    for f in shard_files(folder, stem):
        infos.update(read_header(f))
    return infos
