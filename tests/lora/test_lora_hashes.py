"""The hashes a LoRA is known by: SHA-256 of the file, and AUTOMATIC1111's "Lora hashes" short hash, computed here
independently as A1111 does (modules/hashes.py addnet_hash_safetensors: SHA-256 of everything after the 8-byte
length and the JSON header; extensions-builtin/Lora/network.py: shorthash = the first 12 hex digits, the
metadata's sshs_model_hash taking precedence when the file has one)."""

from __future__ import annotations

import hashlib

import torch
from lora_writers import random_lora, write_kohya, write_peft_dir
from safetensors.torch import load_file, save, save_file

from zimage.weights.lora import read_lora


def a1111_addnet_hash(data: bytes) -> str:
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def kohya_precalculated_hash(tensors: dict, metadata: dict) -> str:
    """sd-scripts' precalculate_safetensors_hashes: the addnet hash of the tensors re-serialised with only the
    ss_* metadata (what it stores as sshs_model_hash)."""
    return a1111_addnet_hash(save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))


def lora_file(tmp_path, name="style.safetensors", metadata=None):
    shapes = {"layers.0.attention.to_q": (64, 64), "layers.1.feed_forward.w2": (64, 170)}
    return write_kohya(tmp_path / name, random_lora(shapes, seed=11), metadata=metadata)


def test_sha256_and_the_a1111_short_hash(tmp_path):
    path = lora_file(tmp_path)
    data = path.read_bytes()
    lora = read_lora(path)
    assert lora.sha256 == hashlib.sha256(data).hexdigest()
    assert lora.addnet_hash == a1111_addnet_hash(data)
    assert lora.short_hash == a1111_addnet_hash(data)[:12]
    assert lora.short_hash != lora.sha256[:12]  # the short hash skips the header: a different number
    assert lora.name == "style"


def test_the_short_hash_ignores_the_metadata_the_file_hash_does_not(tmp_path):
    plain = lora_file(tmp_path, "a.safetensors", metadata={"ss_output_name": "a"})
    tensors = load_file(str(plain))
    other = tmp_path / "b.safetensors"
    save_file(tensors, str(other), metadata={"ss_output_name": "b", "note": "edited"})
    a, b = read_lora(plain), read_lora(other)
    assert a.addnet_hash == b.addnet_hash and a.short_hash == b.short_hash
    assert a.sha256 != b.sha256


def test_a_stored_sshs_model_hash_is_what_a1111_writes(tmp_path):
    stored = "0123456789abcdef" * 4
    lora = read_lora(lora_file(tmp_path, metadata={"sshs_model_hash": stored}))
    assert lora.short_hash == stored[:12]
    assert lora.addnet_hash != stored  # the computed hash is still the file's own
    bad = read_lora(lora_file(tmp_path, "bad.safetensors", metadata={"sshs_model_hash": "not-a-hash"}))
    assert bad.short_hash == bad.addnet_hash[:12]  # A1111 would take any string; we take only 64 hex digits


def test_kohyas_stored_hash_equals_the_computed_one(tmp_path):
    """For a file that safetensors wrote, the hash kohya precomputes and the hash of the file agree: both A1111
    paths give one short hash."""
    metadata = {"ss_network_dim": "4", "ss_output_name": "style"}
    path = lora_file(tmp_path, metadata=metadata)
    tensors = load_file(str(path))
    stored = kohya_precalculated_hash(tensors, metadata)
    lora = read_lora(path)
    assert lora.addnet_hash == stored


def test_a_peft_folder_is_hashed_by_its_weights_file(tmp_path):
    folder = write_peft_dir(tmp_path / "adapter", random_lora({"layers.0.attention.to_v": (64, 64)}, seed=12))
    data = (folder / "adapter_model.safetensors").read_bytes()
    lora = read_lora(folder, name="mine")
    assert lora.name == "mine"
    assert lora.sha256 == hashlib.sha256(data).hexdigest()
    assert lora.short_hash == a1111_addnet_hash(data)[:12]


def test_hashing_reads_files_larger_than_one_read_block(tmp_path):
    """Files over the 1 MiB read block: the data part still hashed whole (A1111 reads in 1 MiB blocks too)."""
    path = tmp_path / "big.safetensors"
    g = torch.Generator().manual_seed(13)
    save_file({"lora_unet_layers_0_feed_forward_w1.lora_down.weight": torch.randn(512, 1024, generator=g),
               "lora_unet_layers_0_feed_forward_w1.lora_up.weight": torch.randn(170, 512, generator=g)}, str(path))
    data = path.read_bytes()
    assert len(data) > 2 * (1 << 20)
    lora = read_lora(path)
    assert lora.sha256 == hashlib.sha256(data).hexdigest()
    assert lora.addnet_hash == a1111_addnet_hash(data)
