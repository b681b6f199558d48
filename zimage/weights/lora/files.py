"""Opening a LoRA file safely: only safetensors (never a pickle), clear errors for empty or cut files, the hashes.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor data. Pickled
PyTorch checkpoints (.ckpt, .pt, .bin, .pth: a zip archive or a raw pickle) are refused without being opened as
pickles: unpickling runs whatever code the file carries.

Hashes, computed in one pass over the file:
- sha256: of the whole file.
- addnet_hash: of the bytes after the 8 + N header bytes (the tensor data only), as kohya sd-scripts'
  `addnet_hash_safetensors` and AUTOMATIC1111's `hashes.addnet_hash_safetensors` compute it; editing the metadata
  does not change it.
- short_hash: what AUTOMATIC1111 writes in the "Lora hashes" infotext: its `NetworkOnDisk.shorthash`, the first 12
  hex digits of the metadata's `sshs_model_hash` (which kohya's trainers store, precomputed the same way) when the
  file has one, else of the addnet hash. A1111 takes the metadata value unchecked; we take it only when it is 64
  hex digits, and otherwise use the computed hash.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from zimage.weights.lora.model import LoraError

_BLOCK = 1 << 20  # bytes per read while hashing
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def check_safetensors(path: Path) -> int:
    """Refuse anything that is not a complete safetensors header; return the header length N. Reads 8 + N bytes.

    The first 8 bytes are a length, so they are only taken for a pickle's or zip's signature once they are not a
    plausible safetensors header (a header of 19280 bytes starts with b"PK" too)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise LoraError(path, "is empty (0 bytes): not a LoRA file (an interrupted download?)")
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            raw = f.read(n) if n is not None and 8 + n <= size else b""
    except OSError as e:
        raise LoraError(path, f"cannot be read: {e.strerror or e}") from None
    if raw.lstrip()[:1] == b"{":
        try:
            json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoraError(path, f"is not a valid safetensors file (its header is not valid JSON: {e})") from None
        return n
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch.save's zip archive; a raw pickle (protocol >= 2)
        raise LoraError(path, "is a pickled PyTorch checkpoint (.ckpt/.pt/.bin), not safetensors; zimage never "
                              "unpickles files (unpickling can run code). Convert it to .safetensors with a tool "
                              "you trust")
    if n is None:
        raise LoraError(path, f"is truncated ({size} bytes): a safetensors file starts with an 8-byte header length")
    if 8 + n > size:
        raise LoraError(path, f"is truncated or not safetensors: its header length says {n} bytes but the file has "
                              f"{size}")
    raise LoraError(path, "is not a safetensors file (its header is not JSON)")


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (as stored, CPU) and the header's __metadata__ ({} when none), through safetensors' reader."""
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        # e.g. "incomplete metadata, file not fully covered": the data section is shorter than the header says
        raise LoraError(path, f"is damaged or truncated ({e}); fetch it again") from None
    if not tensors:
        raise LoraError(path, "holds no tensors: not a LoRA file")
    return tensors, metadata


def hashes(path: Path, header_len: int) -> tuple[str, str]:
    """(sha256 of the whole file, addnet hash = sha256 of the bytes after the 8 + header_len header bytes)."""
    whole, data = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8 + header_len)
        whole.update(head)
        for chunk in iter(lambda: f.read(_BLOCK), b""):
            whole.update(chunk)
            data.update(chunk)
    return whole.hexdigest(), data.hexdigest()


def short_hash(addnet_hash: str, metadata: dict[str, str]) -> str:
    """AUTOMATIC1111's "Lora hashes" entry: 12 hex digits (see the module docstring)."""
    stored = metadata.get("sshs_model_hash", "")
    return (stored if _HEX64.match(stored) else addnet_hash)[:12].lower()
