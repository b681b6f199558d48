"""An optional converted copy of a network's weights (already in the compute dtype), tied to its source files.

Reading 12.3 GB of bf16 instead of 24.6 GB of fp32 halves the bytes read at start-up; whether that is worth the
disk space is measured (benchmarks/bench_memory.py), so it is off by default (EngineConfig.converted_cache).
Layout: $ZIMAGE_CACHE/converted/<network>-<dtype>-<key>/{weights.safetensors, manifest.json}. The key hashes every
source file's path, size, mtime (ns) and header bytes: a source that changes gets a new key, so a stale copy is
never read (and the manifest is checked again on use).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import replace
from pathlib import Path

from zimage.errors import ZImageError

FORMAT = 1  # bump when the layout changes


def fingerprint(checked) -> list[dict]:
    """Path, size, mtime and header hash of each source file of `checked`."""
    out = []
    for path in sorted({info.file for _, info in checked.tensors.values()}):
        st = path.stat()
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = hashlib.sha256(f.read(n)).hexdigest()
        out.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "header": header})
    return out


def entry(checked, dtype) -> tuple[Path, list[dict]]:
    from zimage.weights.locate import zimage_cache

    fp = fingerprint(checked)
    key = hashlib.sha256(json.dumps([FORMAT, str(dtype), fp], sort_keys=True).encode()).hexdigest()[:20]
    name = f"{checked.network.component.name}-{str(dtype).removeprefix('torch.')}-{key}"
    return zimage_cache() / "converted" / name, fp


def differs(checked, dtype) -> bool:
    """Whether any floating-point source tensor is stored in another dtype (else a copy would be the same bytes:
    the bf16 text encoder is not copied)."""
    from zimage.weights.safetensors_files import DTYPES

    target = str(dtype).removeprefix("torch.")
    stored = {DTYPES.get(info.dtype, (target,))[0] for _, info in checked.tensors.values()}
    return any(name != target and "float" in name for name in stored)


def find(checked, dtype):
    """A CheckedNetwork reading from the converted copy, or None if there is none fresh for these sources."""
    from zimage.weights.safetensors_files import read_header

    folder, fp = entry(checked, dtype)
    weights, manifest = folder / "weights.safetensors", folder / "manifest.json"
    if not (weights.is_file() and manifest.is_file()):
        return None
    try:
        if json.loads(manifest.read_text()).get("sources") != fp:
            return None
        header = read_header(weights)  # also rejects a truncated copy
    except (OSError, ValueError, ZImageError):  # a damaged copy is a miss: the sources still load
        return None
    if set(header) != set(checked.tensors) or any(header[k].shape != checked.tensors[k][1].shape for k in header):
        return None
    return replace(checked, tensors={k: (k, header[k]) for k in checked.tensors})


def write(checked, dtype, state: dict) -> Path:
    """Save `state` (module name -> tensor in `dtype`) as the converted copy of `checked`, atomically."""
    from safetensors.torch import save_file

    folder, fp = entry(checked, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".weights-{os.getpid()}.tmp"
    save_file({k: state[k].detach().to("cpu").contiguous() for k in checked.tensors}, str(tmp))
    os.replace(tmp, folder / "weights.safetensors")
    (folder / "manifest.json").write_text(json.dumps({"format": FORMAT, "dtype": str(dtype), "sources": fp}, indent=1))
    return folder
