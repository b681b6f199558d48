"""The converted-weights cache: written once, read instead of the sources, never used once a source changes."""

from __future__ import annotations

import os

import torch

from zimage.weights import converted
from zimage.weights.check import check_model_folder
from zimage.weights.load import LAST_STATS, _slices, load_network


def test_slices_cover_every_tensor_once(tiny_folder):
    checked = check_model_folder(tiny_folder)["transformer"]
    tasks = _slices(checked, 4)
    names = [t for _, chunk in tasks for _, t in chunk]
    assert sorted(names) == sorted(checked.tensors) and len(tasks) >= 4
    assert all(checked.tensors[t][1].file == path for path, chunk in tasks for _, t in chunk)


def test_cache_written_read_and_invalidated(model_copy):
    checked = check_model_folder(model_copy)["transformer"]
    assert converted.differs(checked, torch.bfloat16) and not converted.differs(checked, torch.float32)  # fp32 shards
    assert converted.find(checked, torch.bfloat16) is None
    load_network(checked, "cpu", torch.float32, converted_cache=True)  # the sources are fp32 already: no copy
    assert converted.find(check_model_folder(model_copy)["transformer"], torch.float32) is None
    first = load_network(checked, "cpu", torch.bfloat16, converted_cache=True)  # writes the copy
    assert LAST_STATS["transformer_from"] == "source"
    ref = {k: v.clone() for k, v in first.state_dict().items()}
    fresh = converted.find(check_model_folder(model_copy)["transformer"], torch.bfloat16)
    assert fresh is not None and all(info.file.name == "weights.safetensors" for _, info in fresh.tensors.values())
    again = load_network(check_model_folder(model_copy)["transformer"], "cpu", torch.bfloat16, converted_cache=True)
    assert LAST_STATS["transformer_from"] == "converted cache"
    for k, v in again.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # touch one source shard: the copy is stale and must not be used
    shard = sorted((model_copy / "transformer").glob("*.safetensors"))[0]
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert converted.find(check_model_folder(model_copy)["transformer"], torch.bfloat16) is None
    # another dtype is another copy
    assert converted.find(check_model_folder(model_copy)["transformer"], torch.float16) is None


def test_damaged_copy_is_a_miss(model_copy):
    checked = check_model_folder(model_copy)["transformer"]
    load_network(checked, "cpu", torch.bfloat16, converted_cache=True)
    folder, _ = converted.entry(checked, torch.bfloat16)
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    assert converted.find(check_model_folder(model_copy)["transformer"], torch.bfloat16) is None
