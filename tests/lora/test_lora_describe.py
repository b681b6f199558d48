"""describe(): what `zimage lora inspect` will print, from the normalised LoRA."""

from __future__ import annotations

import json

from lora_writers import random_lora, write_kohya

from zimage.weights.lora import describe, group_targets, read_lora


def test_a_peft_made_lora_is_described(peft_lora):
    path, _, _ = peft_lora
    d = describe(read_lora(path))
    json.dumps(d)  # JSON-able as it is
    assert d["format"] == "diffusers" and d["name"] == "pytorch_lora_weights"
    t = d["networks"]["transformer"]
    assert t["modules"] == 37 and t["ranks"] == [2, 4] and t["alphas"] == [3.0, 8.0]
    assert t["scales"] == [0.75, 2.0, 4.0]
    assert t["targets"] == [
        "layers.0-1: attention.to_q/to_k/to_v/to_out.0, feed_forward.w1/w2/w3, adaLN_modulation.0",
        "noise_refiner.0: attention.to_q/to_k/to_v/to_out.0, feed_forward.w1/w2/w3, adaLN_modulation.0",
        "context_refiner.0: attention.to_q/to_k/to_v/to_out.0, feed_forward.w1/w2/w3",
        "all_final_layer.2-1.adaLN_modulation.1", "all_final_layer.2-1.linear", "all_x_embedder.2-1",
        "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2",
    ]
    assert d["peft_config"]["transformer"]["r"] == 4 and d["peft_config"]["transformer"]["lora_alpha"] == 8
    assert d["short_hash"] == d["addnet_hash"][:12] and len(d["sha256"]) == 64


def test_trainer_metadata_is_shown_and_long_values_left_out(tmp_path):
    shapes = {f"layers.{i}.attention.to_{p}": (64, 64) for i in (0, 1) for p in "qk"}
    metadata = {"ss_network_dim": "4", "ss_network_alpha": "8", "ss_output_name": "my style",
                "ss_tag_frequency": json.dumps({"tag": {str(i): i for i in range(100)}}), "other": "x"}
    d = describe(read_lora(write_kohya(tmp_path / "k.safetensors", random_lora(shapes), metadata=metadata)))
    assert d["format"] == "kohya"
    assert d["trainer"] == {"ss_network_alpha": "8", "ss_network_dim": "4", "ss_output_name": "my style"}
    assert d["networks"]["transformer"]["targets"] == ["layers.0-1: attention.to_q/to_k"]
    assert d["networks"]["transformer"]["parameters"] == 4 * (4 * 64 + 64 * 4)


def test_targets_are_grouped_by_block_ranges():
    names = [f"layers.{i}.attention.to_q" for i in (0, 1, 2, 5, 7, 8)] + ["layers.3.feed_forward.w1",
             "layers.3.feed_forward.w3", "context_refiner.1.attention.to_out.0", "cap_embedder.1"]
    assert group_targets(names) == ["layers.0-2,5,7-8: attention.to_q", "layers.3: feed_forward.w1/w3",
                                    "context_refiner.1: attention.to_out.0", "cap_embedder.1"]
    te = [f"layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    assert group_targets(te) == ["layers.0-2: self_attn.q_proj/o_proj, mlp.down_proj"]
