"""Every bad LoRA input is refused before anything is applied, with a LoraError (a UsageError: exit code 2) whose
message names the file, the first offending key and what was expected."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from lora_writers import random_lora, write_diffusers, write_kohya, write_peft_dir
from safetensors.torch import save_file

from zimage.errors import UsageError
from zimage.weights.lora import LoraError, read_lora, validate

D = 64  # the tiny transformer's dim


def pair(prefix: str, rank: int = 4, out: int = D, inp: int = D, a="lora_A", b="lora_B") -> dict:
    return {f"{prefix}.{a}.weight": torch.randn(rank, inp), f"{prefix}.{b}.weight": torch.randn(out, rank)}


def save(tmp_path, tensors: dict, name="bad.safetensors", metadata=None):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=metadata)
    return path


def refused(call, path, key, *phrases) -> LoraError:
    with pytest.raises(LoraError) as info:
        call()
    msg = str(info.value)
    assert str(path) in msg, msg
    if key is not None:
        assert repr(key) in msg and info.value.key == key, msg
    for p in phrases:
        assert p in msg, msg
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    return info.value


def test_a_key_that_matches_no_module(tmp_path):
    key = "diffusion_model.layers.0.attention.norm_q.lora_A.weight"  # a norm: not a LoRA target
    path = save(tmp_path, {**pair("diffusion_model.layers.0.attention.to_q"),
                           **pair("diffusion_model.layers.0.attention.norm_q")})
    refused(lambda: read_lora(path), path, key, "matches no module of the Z-Image transformer",
            "expected names like layers.N.attention.to_q")


def test_a_text_encoder_key_that_matches_no_module(tmp_path):
    key = "lora_te_layers_0_self_attn_qq_proj.lora_down.weight"
    path = save(tmp_path, pair("lora_te_layers_0_self_attn_qq_proj", a="lora_down", b="lora_up"))
    refused(lambda: read_lora(path), path, key, "the Z-Image text encoder (Qwen3)", "layers.N.self_attn.q_proj")


def test_validate_a_layer_the_model_does_not_have(tmp_path, transformer_shapes):
    path = write_kohya(tmp_path / "deep.safetensors", random_lora({
        "layers.1.attention.to_q": (D, D), "layers.7.attention.to_q": (D, D)}))  # the tiny model has layers 0-1
    lora = read_lora(path)
    refused(lambda: validate(lora, transformer_shapes), path, "lora_unet_layers_7_attention_to_q.lora_down.weight",
            "module 'layers.7.attention.to_q' matches no module of the Z-Image transformer", "layers.N.attention.to_q")


def test_validate_modulation_on_a_context_refiner_block(tmp_path, transformer_shapes):
    """context_refiner blocks are not modulated: no adaLN_modulation there."""
    path = write_diffusers(tmp_path / "cr.safetensors", random_lora({"context_refiner.0.adaLN_modulation.0": (256, D)}))
    lora = read_lora(path)
    refused(lambda: validate(lora, transformer_shapes), path,
            "transformer.context_refiner.0.adaLN_modulation.0.lora_A.weight", "matches no module")


def test_validate_a_shape_that_does_not_fit(tmp_path, transformer_shapes):
    """A LoRA for the full-size model (dim 3840) on the tiny one (dim 64)."""
    path = write_diffusers(tmp_path / "big.safetensors", random_lora({"layers.0.attention.to_k": (3840, 3840)}))
    lora = read_lora(path)
    refused(lambda: validate(lora, transformer_shapes), path, "transformer.layers.0.attention.to_k.lora_A.weight",
            "does not fit module 'layers.0.attention.to_k'", "(3840, 3840)", f"({D}, {D})")


def test_validate_the_text_encoder_layer_zimage_does_not_run(tmp_path, text_encoder_shapes):
    """zimage's text encoder stops before the last Qwen3 layer (the pipeline reads its input): a LoRA on that
    layer targets no module zimage has, and validate says so (the caller decides what to do with such files)."""
    path = write_kohya(tmp_path / "te.safetensors", random_lora({"layers.2.mlp.up_proj": (64, 32)}),
                       prefix="lora_te_")
    lora = read_lora(path)
    refused(lambda: validate(lora, text_encoder_shapes, network="text_encoder"), path,
            "lora_te_layers_2_mlp_up_proj.lora_down.weight", "matches no module of the Z-Image text encoder")


def test_a_rank_mismatch_between_down_and_up(tmp_path):
    t = pair("transformer.layers.0.attention.to_v")
    t["transformer.layers.0.attention.to_v.lora_B.weight"] = torch.randn(D, 3)
    path = save(tmp_path, t)
    refused(lambda: read_lora(path), path, "transformer.layers.0.attention.to_v.lora_A.weight", "rank mismatch",
            "rank 4", "rank 3")


def test_a_down_without_its_up(tmp_path):
    t = {**pair("lora_unet_layers_0_feed_forward_w1", a="lora_down", b="lora_up"),
         "lora_unet_layers_0_feed_forward_w2.lora_down.weight": torch.randn(4, 170)}
    path = save(tmp_path, t)
    refused(lambda: read_lora(path), path, "lora_unet_layers_0_feed_forward_w2.lora_down.weight",
            "no up weight")


@pytest.mark.parametrize("key, phrase", [
    ("lycoris_layers_0_attention_to_q.lokr_w1", "LoKr"),
    ("diffusion_model.layers.0.attention.to_q.lokr_w2_a", "LoKr"),
    ("diffusion_model.layers.0.attention.to_q.hada_w1_a", "LoHa"),
    ("lora_unet_layers_0_attention_to_q.lora_mid.weight", "Tucker"),
    ("diffusion_model.layers.0.attention.to_k.dora_scale", "DoRA"),
    ("transformer.layers.0.attention.to_k.lora_magnitude_vector", "DoRA"),
    ("transformer.layers.0.attention.to_k.lora_B.bias", "LoRA bias"),
])
def test_lycoris_and_lora_extensions_are_not_supported(tmp_path, key, phrase):
    t = {**pair("transformer.layers.1.attention.to_q"), key: torch.randn(4, 4)}
    path = save(tmp_path, t)
    refused(lambda: read_lora(path), path, key, phrase, "not supported")


@pytest.mark.parametrize("keys, model, shown_by", [
    (["lora_unet_double_blocks_0_img_attn_qkv", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"], "Flux",
     "double_blocks"),
    (["transformer.single_transformer_blocks.0.attn.to_q"], "Flux", "single_transformer_blocks"),
    (["transformer.transformer_blocks.0.attn.to_q"], "Flux (or another MMDiT model", "transformer_blocks.0.attn"),
    (["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2",
      "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"], "SDXL", "down_blocks"),
    (["lora_unet_input_blocks_4_1_proj_in"], "Stable Diffusion (SD 1.x/2.x, or SDXL", "input_blocks"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1"], "Stable Diffusion, SDXL or Flux (a CLIP text encoder)",
     "text_model"),
    (["transformer.transformer_blocks.0.img_mlp.net.0.proj"], "Qwen-Image", "img_mlp"),
])
def test_a_lora_for_another_model(tmp_path, keys, model, shown_by):
    t = {}
    for k in keys:
        t.update(pair(k, a="lora_down", b="lora_up"))
    path = save(tmp_path, t)
    err = refused(lambda: read_lora(path), path, None, f"this LoRA is for {model}", "not Z-Image")
    assert err.key in t and shown_by in err.key and repr(err.key) in str(err)


def test_an_unknown_key_is_not_dropped(tmp_path):
    key = "diffusion_model.layers.0.attention.to_q.weight"  # a full weight, not a LoRA factor
    path = save(tmp_path, {**pair("diffusion_model.layers.0.attention.to_k"), key: torch.randn(D, D)})
    refused(lambda: read_lora(path), path, key, "is not a LoRA weight")


def test_a_leftover_alpha_is_not_dropped(tmp_path):
    key = "lora_unet_layers_0_attention_to_k.alpha"
    t = {**pair("lora_unet_layers_0_attention_to_q", a="lora_down", b="lora_up"),
         "lora_unet_layers_0_attention_to_q.alpha": torch.tensor(4.0), key: torch.tensor(4.0)}
    path = save(tmp_path, t)
    refused(lambda: read_lora(path), path, key, "no LoRA down/up weights", "leftover")


def test_different_alphas_for_one_module(tmp_path):
    t = {**pair("layers.0.attention.to.q", a="lora.down", b="lora.up"),
         "layers.0.attention.to_q.alpha": torch.tensor(4.0),
         "diffusion_model.layers.0.attention.to_q.alpha": torch.tensor(8.0)}
    path = save(tmp_path, t)
    refused(lambda: read_lora(path), path, "layers.0.attention.to.q.lora.down.weight", "several different alphas")


def test_two_copies_of_a_module_that_disagree(tmp_path):
    """A fused qkv next to split q/k/v with a different update: diffusers would drop one, ComfyUI add both."""
    t = {**pair("layers.0.attention.to.q", a="lora.down", b="lora.up"),
         **pair("layers.0.attention.to.k", a="lora.down", b="lora.up"),
         **pair("layers.0.attention.to.v", a="lora.down", b="lora.up"),
         **pair("layers.0.attention.qkv", out=3 * D, a="lora.down", b="lora.up")}
    path = save(tmp_path, t)
    refused(lambda: read_lora(path), path, "layers.0.attention.qkv.lora.down.weight", "twice with different updates",
            "layers.0.attention.to.k.lora.down.weight")  # to_k: the first of the three modules by name


def test_a_fused_qkv_whose_rows_are_not_three_parts(tmp_path):
    path = save(tmp_path, pair("diffusion_model.layers.0.attention.qkv", out=3 * D + 1, a="lora_down", b="lora_up"))
    refused(lambda: read_lora(path), path, "diffusion_model.layers.0.attention.qkv.lora_down.weight", "3 * dim rows")


@pytest.mark.parametrize("bad, phrase", [
    (torch.full((4, D), float("nan")), "NaN"),
    (torch.randn(4, D, 1, 1), "2-D"),
    (torch.randint(0, 3, (4, D), dtype=torch.int32), "floating point"),
])
def test_bad_tensors(tmp_path, bad, phrase):
    t = pair("transformer.layers.0.attention.to_q")
    t["transformer.layers.0.attention.to_q.lora_A.weight"] = bad
    path = save(tmp_path, t)
    refused(lambda: read_lora(path), path, "transformer.layers.0.attention.to_q.lora_A.weight", phrase)


def test_an_alpha_that_is_not_one_number(tmp_path):
    key = "lora_unet_layers_0_attention_to_q.alpha"
    t = {**pair("lora_unet_layers_0_attention_to_q", a="lora_down", b="lora_up"), key: torch.tensor([4.0, 4.0])}
    path = save(tmp_path, t)
    refused(lambda: read_lora(path), path, key, "one number")


class _Evil:
    """Unpickling this creates a file: proof that reading never unpickles."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "disguised.safetensors"])
def test_a_pickle_is_refused_without_being_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"x": _Evil(marker)}, path)  # torch's zip archive holding a pickle
    else:
        path.write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    refused(lambda: read_lora(path), path, None, "pickled PyTorch checkpoint", "never unpickles")
    assert not marker.exists()


def test_empty_and_truncated_files(tmp_path):
    good = save(tmp_path, pair("transformer.layers.0.attention.to_q"), name="good.safetensors")
    data = good.read_bytes()
    cases = {"empty.safetensors": (b"", "is empty"),
             "tiny.safetensors": (data[:5], "is truncated (5 bytes)"),
             "header.safetensors": (data[:40], "is truncated or not safetensors"),
             "data.safetensors": (data[:-100], "damaged or truncated"),
             "garbage.safetensors": ((20).to_bytes(8, "little") + b"x" * 30, "header is not JSON")}
    for name, (content, phrase) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        refused(lambda: read_lora(path), path, None, phrase)


def test_a_missing_path_and_a_folder_that_is_no_lora(tmp_path):
    refused(lambda: read_lora(tmp_path / "nope.safetensors"), tmp_path / "nope.safetensors", None, "does not exist")
    (tmp_path / "folder").mkdir()
    refused(lambda: read_lora(tmp_path / "folder"), tmp_path / "folder", None, "adapter_config.json")


def test_a_peft_folder_with_a_pickled_adapter(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    refused(lambda: read_lora(folder), folder, None, "adapter_model.safetensors", "adapter_model.bin", "pickles")


@pytest.mark.parametrize("config, phrase", [
    ({"r": 8}, "PEFT config gives r=8"),
    ({"peft_type": "LOHA"}, "only LORA"),
    ({"use_dora": True}, "DoRA is not supported"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"bias": "all"}, "bias='all'"),
])
def test_peft_configs_that_are_refused(tmp_path, config, phrase):
    folder = write_peft_dir(tmp_path / "adapter", random_lora({"layers.0.attention.to_q": (D, D)}),
                            extra_config=config)
    key = "base_model.model.layers.0.attention.to_q.lora_A.weight" if "r" in config else None
    refused(lambda: read_lora(folder), folder, key, phrase)


def test_an_alpha_key_and_a_peft_config_together_are_ambiguous(tmp_path):
    key = "transformer.layers.0.attention.to_q.alpha"
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    path = save(tmp_path, {**pair("transformer.layers.0.attention.to_q"), key: torch.tensor(2.0)}, metadata=meta)
    refused(lambda: read_lora(path), path, key, "ambiguous")
