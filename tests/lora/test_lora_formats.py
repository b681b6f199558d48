"""Every layout of the same LoRA reads into the same per-module updates, equal to what diffusers + PEFT make of it.

The LoRA is made with PEFT on the tiny transformer (every linear layer, r=4, lora_alpha=8, a rank_pattern and an
alpha_pattern entry) and saved in the diffusers layout; the tests re-write its factors in each other layout. The
update compared is scale * up @ down per module, (out, in) fp32, within 1e-6.
"""

from __future__ import annotations

import torch
from lora_reference import assert_same_deltas, diffusers_deltas, peft_layer_deltas, randomise_lora_parameters
from lora_writers import (
    ORIGINAL_NAMES, F, expected_deltas, random_lora, write_ai_toolkit, write_comfy_fused, write_diffsynth,
    write_diffusers, write_dot, write_kohya, write_peft_dir,
)
from safetensors.torch import load_file, save_file

from zimage.weights.lora import read_lora, validate


def ours(lora) -> dict[str, torch.Tensor]:
    return {m: f.delta() for m, f in lora.transformer.items()}


def test_a_peft_made_diffusers_file_reads_as_diffusers_and_peft_apply_it(peft_lora, tiny_folder, transformer_shapes):
    path, _, peft = peft_lora
    lora = read_lora(path)
    assert lora.format == "diffusers"
    assert set(lora.networks) == {"transformer"}
    assert sorted(lora.transformer) == sorted(transformer_shapes)  # all 37 linear layers, zimage's names
    assert_same_deltas(ours(lora), peft)
    assert_same_deltas(ours(lora), diffusers_deltas(tiny_folder, path))
    # the header's lora_adapter_metadata is what scales it: lora_alpha / r, with the patterns
    to_q = lora.transformer["layers.0.attention.to_q"]
    assert (to_q.scale, to_q.rank) == (4.0, 2)
    assert lora.transformer["layers.1.feed_forward.w2"].scale == 0.75
    assert lora.transformer["layers.1.feed_forward.w1"].scale == 2.0
    validate(lora, transformer_shapes)


def _check_layout(tmp_path, tiny_folder, peft_lora, write, fmt, **kw):
    _, factors, peft = peft_lora
    path = write(tmp_path / f"{fmt}.safetensors", factors, **kw)
    lora = read_lora(path)
    assert lora.format == fmt
    assert_same_deltas(ours(lora), peft)
    assert_same_deltas(ours(lora), diffusers_deltas(tiny_folder, path))
    return lora


def test_kohya_musubi_layout(tmp_path, tiny_folder, peft_lora):
    lora = _check_layout(tmp_path, tiny_folder, peft_lora, write_kohya, "kohya")
    f = lora.transformer["all_final_layer.2-1.adaLN_modulation.1"]  # an underscore-heavy name mapped back exactly
    assert f.key == "lora_unet_all_final_layer_2-1_adaLN_modulation_1.lora_down.weight" and f.alpha == 8.0


def test_ai_toolkit_layout_with_alpha_keys(tmp_path, tiny_folder, peft_lora):
    lora = _check_layout(tmp_path, tiny_folder, peft_lora, write_ai_toolkit, "ai-toolkit", alphas=True)
    assert lora.transformer["layers.1.attention.to_k"].scale == 2.0  # alpha 8 / rank 4 (diffusers issue 13249)


def test_ai_toolkit_layout_without_alpha_keys(tmp_path, tiny_folder, peft_lora):
    lora = _check_layout(tmp_path, tiny_folder, peft_lora, write_ai_toolkit, "ai-toolkit", alphas=False)
    assert {f.scale for f in lora.transformer.values()} == {1.0}


def test_diffsynth_layout(tmp_path, tiny_folder, peft_lora):
    lora = _check_layout(tmp_path, tiny_folder, peft_lora, write_diffsynth, "diffsynth")
    assert {f.scale for f in lora.transformer.values()} == {1.0}


def test_dot_layout(tmp_path, tiny_folder, peft_lora):
    lora = _check_layout(tmp_path, tiny_folder, peft_lora, write_dot, "lora-dot")
    assert lora.transformer["layers.0.attention.to_k"].key == "layers.0.attention.to.k.lora.down.weight"


def test_prefixes_diffusers_does_not_load_read_as_peft_applies_them(tmp_path, peft_lora):
    """Bare lora_A/lora_B keys (a PEFT state dict; ComfyUI accepts them), PEFT's base_model.model. prefix in one
    file, and ComfyUI's model.diffusion_model. prefix with kohya suffixes: ZImagePipeline.load_lora_weights loads
    none of these (it keeps only keys under "transformer."), so the reference is PEFT's own update."""
    _, factors, peft = peft_lora
    for prefix, fmt in (("", "diffusers"), ("base_model.model.", "peft")):
        lora = read_lora(write_diffusers(tmp_path / f"p{len(prefix)}.safetensors", factors, prefix=prefix))
        assert lora.format == fmt
        assert_same_deltas(ours(lora), peft)
    t = {}
    for m, f in factors.items():
        t[f"model.diffusion_model.{m}.lora_down.weight"], t[f"model.diffusion_model.{m}.lora_up.weight"] = f.down, f.up
        t[f"model.diffusion_model.{m}.alpha"] = torch.tensor(f.alpha)
    save_file(t, str(tmp_path / "comfy.safetensors"))
    lora = read_lora(tmp_path / "comfy.safetensors")
    assert lora.format == "comfyui"
    assert_same_deltas(ours(lora), peft)


def comfyui_deltas(path, dim: int) -> dict[str, torch.Tensor]:
    """ComfyUI's semantics, written out here from its Lumina2 key map (comfy/utils.py z_image_to_diffusers, comfy
    lora.py): a key on the original name patches that weight with (alpha / down rows) * up @ down; to_q/to_k/to_v are
    the row slices (0, dim), (dim, dim), (2 dim, dim) of attention.qkv, so a qkv LoRA's update is cut the same way."""
    sd = load_file(str(path))
    renames = {theirs: ours for ours, theirs in ORIGINAL_NAMES.items()}
    out = {}
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        down, up = sd[key].double(), sd[base + ".lora_up.weight"].double()
        delta = (up @ down) * (sd[base + ".alpha"].item() / down.shape[0])
        name = base.removeprefix("diffusion_model.")
        if name.startswith("lora_unet_"):  # musubi's underscored names, undone for this test's few module kinds
            name = (name.removeprefix("lora_unet_").replace("_", ".").replace("final.layer", "final_layer")
                    .replace("adaLN.modulation", "adaLN_modulation").replace("feed.forward", "feed_forward")
                    .replace("x.embedder", "x_embedder").replace("cap.embedder", "cap_embedder")
                    .replace("t.embedder", "t_embedder").replace("noise.refiner", "noise_refiner")
                    .replace("context.refiner", "context_refiner"))
        if name.endswith(".attention.qkv"):
            block = name[: -len(".attention.qkv")]
            for i, p in enumerate(("to_q", "to_k", "to_v")):
                out[f"{block}.attention.{p}"] = delta[i * dim:(i + 1) * dim].float()
            continue
        for theirs, zimage in renames.items():
            if name == theirs or name.endswith("." + theirs):
                name = name[: len(name) - len(theirs)] + zimage
        out[name] = delta.float()
    return out


def test_comfyui_fused_qkv_block_diagonal(tmp_path, peft_lora, transformer_shapes):
    """The LoRA in ComfyUI's names with q/k/v fused block-diagonally (musubi-tuner's ComfyUI export), dotted with
    diffusion_model. and underscored with lora_unet_. diffusers' loader does not read a kohya-suffix qkv key, so
    the references are ComfyUI's documented semantics and PEFT's own update of the unfused LoRA."""
    _, factors, peft = peft_lora
    dim = transformer_shapes["layers.0.attention.to_q"][0]
    for underscored in (False, True):
        path = write_comfy_fused(tmp_path / f"fused{underscored}.safetensors", factors,
                                 prefix="lora_unet_" if underscored else "diffusion_model.", underscored=underscored)
        lora = read_lora(path)
        assert lora.format == "comfyui-fused-qkv"
        assert_same_deltas(ours(lora), peft)
        assert_same_deltas(ours(lora), comfyui_deltas(path, dim))
        # block-diagonal thirds keep only their own rank columns: the ranks of the unfused LoRA
        assert lora.transformer["layers.0.attention.to_q"].rank == 2
        assert lora.transformer["layers.0.attention.to_v"].rank == 4
        validate(lora, transformer_shapes)


def test_musubi_fused_qkv_with_tripled_alpha(tmp_path, transformer_shapes):
    """musubi-tuner's convert_z_image_lora_to_comfy: down = cat(q, k, v downs), up = block_diag of the ups
    (unscaled), alpha x 3 (the rank is 3x): the same update as the split LoRA."""
    lora = random_lora({m: s for m, s in transformer_shapes.items() if m.startswith("layers.1.attention.to_")},
                       rank=4, alpha=8.0, seed=3)
    q, k, v = (lora[f"layers.1.attention.to_{p}"] for p in "qkv")
    t = {"lora_unet_layers_1_attention_qkv.lora_down.weight": torch.cat([q.down, k.down, v.down]),
         "lora_unet_layers_1_attention_qkv.lora_up.weight": torch.block_diag(q.up, k.up, v.up),
         "lora_unet_layers_1_attention_qkv.alpha": torch.tensor(24.0),
         "lora_unet_layers_1_attention_out.lora_down.weight": lora["layers.1.attention.to_out.0"].down,
         "lora_unet_layers_1_attention_out.lora_up.weight": lora["layers.1.attention.to_out.0"].up,
         "lora_unet_layers_1_attention_out.alpha": torch.tensor(8.0)}
    save_file({k_: v_.contiguous() for k_, v_ in t.items()}, str(tmp_path / "musubi.safetensors"))
    got = read_lora(tmp_path / "musubi.safetensors")
    assert_same_deltas(ours(got), expected_deltas(lora))
    assert {f.scale for f in got.transformer.values()} == {2.0}  # 24 / 12 and 8 / 4


def test_fused_qkv_with_a_shared_down_matches_diffusers(tmp_path, tiny_folder, transformer_shapes):
    """A genuine fused LoRA (one down (r, in) shared by q, k, v; up (3 dim, r)) in the dot form, which diffusers'
    loader splits itself: three factors sharing down, taking the row thirds of up."""
    dim = transformer_shapes["layers.0.attention.to_q"][0]
    g = torch.Generator().manual_seed(5)
    t = {}
    for block in ("layers.0", "layers.1", "noise_refiner.0"):
        t[f"{block}.attention.qkv.lora.down.weight"] = torch.randn(3, dim, generator=g) * 0.2
        t[f"{block}.attention.qkv.lora.up.weight"] = torch.randn(3 * dim, 3, generator=g) * 0.2
        t[f"{block}.attention.qkv.alpha"] = torch.tensor(6.0)
    save_file(t, str(tmp_path / "qkv.safetensors"))
    lora = read_lora(tmp_path / "qkv.safetensors")
    assert lora.format == "comfyui-fused-qkv"
    assert len(lora.transformer) == 9
    assert_same_deltas(ours(lora), diffusers_deltas(tiny_folder, tmp_path / "qkv.safetensors"))
    q, k = lora.transformer["layers.0.attention.to_q"], lora.transformer["layers.0.attention.to_k"]
    assert torch.equal(q.down, k.down) and q.scale == 2.0 and q.rank == 3


def test_duplicated_modules_as_anime_z_files_carry_them_are_used_once(tmp_path, tiny_folder, peft_lora):
    """Files with to.q/to.k/to.v next to a fused attention.qkv of the same update, and attention.out next to
    attention.to_out.0 (one to_out.0.alpha for both): diffusers keeps the split / to_out.0 copies; so do we,
    after checking that the copies agree, and say so in notes."""
    _, factors, peft = peft_lora
    path = write_dot(tmp_path / "dot.safetensors", factors)
    t = load_file(str(path))
    for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"):
        parts = [factors[f"{block}.attention.to_{p}"] for p in "qkv"]
        fused_down = torch.cat([f.down for f in parts])
        t[f"{block}.attention.qkv.lora.down.weight"] = fused_down
        ups = [f.up * f.alpha / f.down.shape[0] for f in parts]  # each part's scale folded: fused alpha = rank
        t[f"{block}.attention.qkv.lora.up.weight"] = torch.block_diag(*ups)
        t[f"{block}.attention.qkv.alpha"] = torch.tensor(float(fused_down.shape[0]))
        out = factors[f"{block}.attention.to_out.0"]
        t[f"{block}.attention.out.lora.down.weight"], t[f"{block}.attention.out.lora.up.weight"] = out.down, out.up
    save_file(t, str(tmp_path / "animez.safetensors"))
    lora = read_lora(tmp_path / "animez.safetensors")
    assert_same_deltas(ours(lora), peft)
    assert_same_deltas(ours(lora), diffusers_deltas(tiny_folder, tmp_path / "animez.safetensors"))
    assert lora.transformer["layers.0.attention.to_q"].key == "layers.0.attention.to.q.lora.down.weight"
    assert lora.transformer["layers.0.attention.to_out.0"].key == "layers.0.attention.to_out.0.lora.down.weight"
    assert len(lora.notes) == 4 * 4  # per block: q, k, v from the fused copy, and attention.out
    assert any("layers.0.attention.out.lora.down.weight is a copy" in n for n in lora.notes)


def test_a_peft_folder_of_the_transformer(tmp_path, tiny_folder, transformer_shapes):
    """PeftModel.save_pretrained of the tiny transformer: adapter_config.json (r, lora_alpha) + base_model.model.*
    keys; the update is PEFT's scaling * B @ A."""
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model

    model = ZImageTransformer2DModel.from_pretrained(tiny_folder / "transformer", torch_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v", "w1", "w3"]))
    randomise_lora_parameters(peft_model, seed=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    lora = read_lora(tmp_path / "adapter")
    assert (lora.format, lora.name) == ("peft", "adapter")
    assert lora.peft_config["r"] == 4 and lora.peft_config["lora_alpha"] == 6
    assert_same_deltas(ours(lora), peft_layer_deltas(peft_model))
    assert {f.scale for f in lora.transformer.values()} == {1.5}
    validate(lora, transformer_shapes)


def test_text_encoder_lora_from_peft_with_rslora(tmp_path, tiny_folder, text_encoder_shapes):
    """PEFT on the tiny Qwen3 text encoder, use_rslora (scale lora_alpha / sqrt(r)) and a rank_pattern: a PEFT
    folder whose module names are Qwen3's. The same LoRA as kohya lora_te_ keys and diffusers text_encoder. keys
    (their alpha = scale * rank) reads the same. diffusers' Z-Image loader loads no text-encoder LoRA, so PEFT's
    own update is the reference."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Model

    model = Qwen3Model.from_pretrained(tiny_folder / "text_encoder", dtype=torch.float32)
    # layers 0 and 1: the layers zimage runs (the pipeline reads the last layer's input, hidden_states[-2])
    config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"layers.1.mlp.up_proj": 2},
                        target_modules=r".*layers\.[01]\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
    peft_model = get_peft_model(model, config)
    randomise_lora_parameters(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path / "te-adapter")
    want = peft_layer_deltas(peft_model)
    lora = read_lora(tmp_path / "te-adapter")
    assert set(lora.networks) == {"text_encoder"}
    te = {m: f.delta() for m, f in lora.text_encoder.items()}
    assert_same_deltas(te, want)
    assert sorted(te) == sorted(text_encoder_shapes)  # zimage's Qwen3 names, every linear layer of layers 0..1
    assert lora.text_encoder["layers.0.self_attn.q_proj"].scale == 3.0  # 6 / sqrt(4)
    assert abs(lora.text_encoder["layers.1.mlp.up_proj"].scale - 6 / 2 ** 0.5) < 1e-12
    validate(lora, text_encoder_shapes, network="text_encoder")
    factors = {m: F(f.down, f.up, f.scale * f.rank) for m, f in lora.text_encoder.items()}
    for write, kw in ((write_kohya, {"prefix": "lora_te_"}), (write_diffusers, {"prefix": "text_encoder."})):
        other = read_lora(write(tmp_path / f"te-{write.__name__}.safetensors", factors, **kw))
        assert set(other.networks) == {"text_encoder"}
        assert_same_deltas({m: f.delta() for m, f in other.text_encoder.items()}, want)


def test_one_file_with_transformer_and_text_encoder_keys(tmp_path, transformer_shapes, text_encoder_shapes):
    """kohya lora_unet_ + lora_te_ in one file: two networks, each module where its name says."""
    unet = random_lora({m: s for m, s in transformer_shapes.items() if m.startswith("layers.0.")}, seed=6)
    te = random_lora({m: s for m, s in text_encoder_shapes.items() if m.startswith("layers.1.")}, seed=7, alpha=2.0)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_kohya(a, unet), write_kohya(b, te, prefix="lora_te_")
    save_file({**load_file(str(a)), **load_file(str(b))}, str(tmp_path / "both.safetensors"))
    lora = read_lora(tmp_path / "both.safetensors")
    assert sorted(lora.networks) == ["text_encoder", "transformer"]
    assert_same_deltas(ours(lora), expected_deltas(unet))
    assert_same_deltas({m: f.delta() for m, f in lora.text_encoder.items()}, expected_deltas(te))


def test_peft_folder_written_by_hand_with_patterns(tmp_path, transformer_shapes):
    """adapter_config.json's rank_pattern / alpha_pattern (PEFT's regex-at-a-dot-boundary match) per module."""
    shapes = {m: s for m, s in transformer_shapes.items() if m.startswith(("layers.1.", "cap_embedder"))}
    lora = random_lora(shapes, rank=4, alpha=4.0, seed=8, ranks={"layers.1.feed_forward.w2": 2},
                       alphas={"cap_embedder.1": 16.0})
    got = read_lora(write_peft_dir(tmp_path / "hand", lora))
    assert_same_deltas(ours(got), expected_deltas(lora))
    assert got.transformer["cap_embedder.1"].scale == 4.0 and got.transformer["layers.1.feed_forward.w2"].scale == 2.0

