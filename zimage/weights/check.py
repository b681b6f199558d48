"""Checking a model folder before any long work: every part present, no truncated file, every tensor's name and
shape matching the network its config describes. Errors name the folder, file and tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from zimage.errors import ModelFolderError
from zimage.weights.layout import MODEL_INDEX, SCHEDULER_CONFIG, TOKENIZER_DIR, TOKENIZER_FILE_SETS
from zimage.weights.networks import BUILDERS, OPTIONAL_BUILDERS, MetaNetwork
from zimage.weights.safetensors_files import DTYPES, TensorInfo, read_component_headers


@dataclass
class CheckedNetwork:
    network: MetaNetwork
    tensors: dict[str, tuple[str, TensorInfo]]  # module name -> (stored name, where/how stored), tensors we load
    nbytes: int  # bytes on disk of the tensors we load




def check_small_parts(folder: Path) -> None:
    """model_index.json, tokenizer and scheduler are present."""
    if not (folder / MODEL_INDEX).is_file():
        raise ModelFolderError(f"{folder} is not a Z-Image model folder: {MODEL_INDEX} is missing")
    tok = folder / TOKENIZER_DIR
    if not any(all((tok / f).is_file() for f in files) for files in TOKENIZER_FILE_SETS):
        raise ModelFolderError(f"{folder} is missing the tokenizer ({TOKENIZER_DIR}/tokenizer.json or vocab.json + merges.txt)")
    if not (folder / SCHEDULER_CONFIG).is_file():
        raise ModelFolderError(f"{folder} is missing {SCHEDULER_CONFIG}")


def check_network(folder: Path, name: str) -> CheckedNetwork:
    """Build `name` (a key of BUILDERS or OPTIONAL_BUILDERS) on the meta device and match the checkpoint against it,
    strictly."""
    network = {**BUILDERS, **OPTIONAL_BUILDERS}[name](folder)
    part = network.component.name  # the sub-folder ("vae" for both VAE halves)
    headers = read_component_headers(folder / part, network.component.weights_stem)
    expected = {k: tuple(v.shape) for k, v in network.module.state_dict().items()}
    tensors: dict[str, tuple[str, TensorInfo]] = {}
    unexpected = []
    for stored_name, info in headers.items():
        target = network.rename(stored_name)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(stored_name)
            continue
        if info.shape != expected[target]:
            raise ModelFolderError(
                f"{info.file}: tensor {stored_name!r} has shape {list(info.shape)} but {part}/config.json implies "
                f"{list(expected[target])} (a config from another model?)"
            )
        tensors[target] = (stored_name, info)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelFolderError(f"{folder / part} lacks {len(missing)} tensors the network needs: {shown}")
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise ModelFolderError(f"{folder / part} has {len(unexpected)} tensors the network does not know: {shown}")
    nbytes = sum(DTYPES.get(t.dtype, ("", 4))[1] * math.prod(t.shape) for _, t in tensors.values())
    return CheckedNetwork(network, tensors, nbytes)


def check_model_folder(folder: Path) -> dict[str, CheckedNetwork]:
    """All parts of a folder; raises ModelFolderError naming the first problem found."""
    check_small_parts(folder)
    return {name: check_network(folder, name) for name in BUILDERS}

