"""The key grammar of Z-Image LoRA files: every producer's spelling of "which module, down or up" -> zimage's name.

A key is PREFIX + MODULE PATH + ROLE SUFFIX, e.g.

    transformer.            layers.0.attention.to_q     .lora_A.weight        diffusers / PEFT
    diffusion_model.        layers.0.attention.to_q     .lora_A.weight        ostris ai-toolkit (+ optional .alpha)
    lora_unet_              layers_0_attention_to_q     .lora_down.weight     kohya sd-scripts / musubi-tuner + .alpha
    (none)                  layers.0.attention.to_q     .lora_A.default.weight  DiffSynth-Studio (PEFT adapter name)
    (none)                  layers.0.attention.to.q     .lora.down.weight     "dot" community files
    diffusion_model.        layers.0.attention.qkv      .lora_down.weight     ComfyUI names: fused q/k/v, attention.out

Module names are zimage's (= diffusers' ZImageTransformer2DModel, = transformers' Qwen3Model for the text encoder).
The original / ComfyUI checkpoint spells some differently: attention.out (to_out.0), x_embedder (all_x_embedder.2-1),
final_layer.* (all_final_layer.2-1.*) and one fused attention.qkv for to_q, to_k, to_v (rows q, then k, then v).
Underscored prefixes (lora_unet_ ...) replace every "." of the module path by "_"; they are mapped back through the
fixed list of module names below, so names that contain "_" themselves (feed_forward, adaLN_modulation) are exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from zimage.weights.lora.model import TEXT_ENCODER, TRANSFORMER, LoraError

# Role suffixes: (suffix, role, style). Longest first where one ends another (".lora_A.default.weight").
SUFFIXES = (
    (".lora_A.default.weight", "down", "peft-default"),
    (".lora_B.default.weight", "up", "peft-default"),
    (".lora_A.weight", "down", "A/B"),
    (".lora_B.weight", "up", "A/B"),
    (".lora_down.weight", "down", "down/up"),
    (".lora_up.weight", "up", "down/up"),
    (".lora.down.weight", "down", "dot"),
    (".lora.up.weight", "up", "dot"),
    (".alpha", "alpha", ""),
)

# Prefixes: (prefix, network or None = decided by the module name, how the path is spelled).
PREFIXES = (
    ("base_model.model.", None, "dotted"),  # PEFT's save_pretrained
    ("model.diffusion_model.", TRANSFORMER, "dotted"),  # original / ComfyUI checkpoint prefix
    ("diffusion_model.", TRANSFORMER, "dotted"),  # ai-toolkit, ComfyUI
    ("transformer.", TRANSFORMER, "dotted"),  # diffusers
    ("text_encoders.qwen3_4b.transformer.", TEXT_ENCODER, "dotted"),  # ComfyUI's text-encoder key names
    ("text_encoder.", TEXT_ENCODER, "dotted"),  # diffusers
    ("lora_unet_", TRANSFORMER, "underscored"),  # kohya sd-scripts, musubi-tuner
    ("lora_transformer_", TRANSFORMER, "underscored"),  # OneTrainer's prefix for DiT models
    ("lycoris_", TRANSFORMER, "underscored"),  # SimpleTuner's LyCORIS-LoRA files (ComfyUI accepts it)
    ("lora_te1_", TEXT_ENCODER, "underscored"),  # kohya-style text encoder (Qwen3)
    ("lora_te_", TEXT_ENCODER, "underscored"),
)

# Adapters that are not LoRA, or LoRA extensions we do not apply: refused with the reason (regex on the key).
UNSUPPORTED = (
    (r"\.lokr_(w[12](_[ab])?|t[12])$", "is a LoKr (LyCORIS) weight: LoKr files are not supported, only LoRA "
                                       "(down/up pairs)"),
    (r"\.hada_(w[12]_[ab]|t[12])$", "is a LoHa (LyCORIS) weight: LoHa files are not supported, only LoRA "
                                    "(down/up pairs)"),
    (r"(\.dora_scale|\.lora_magnitude_vector(\.default)?(\.weight)?)$", "is a DoRA magnitude: DoRA is not "
                                                                         "supported, only plain LoRA"),
    (r"\.lora_mid\.weight$", "is a LoCon/LyCORIS mid (Tucker) weight: not supported, only LoRA (down/up pairs)"),
    (r"\.lora_[AB](\.default)?\.bias$", "is a LoRA bias (PEFT lora_bias=True): not supported"),
    (r"\.oft_[A-Za-z_]+$|\.oft_blocks$", "is an OFT/BOFT weight: not supported, only LoRA"),
    (r"\.(diff|diff_b|w_norm|b_norm|set_weight)$", "is a full-weight or norm difference (LyCORIS full/norm module): "
                                                   "not supported, only LoRA"),
    (r"\.(a1|a2|b1|b2)\.weight$", "is a GLoRA weight: not supported, only LoRA"),
    (r"\.lora_embedding_[AB]", "is a LoRA on an embedding: not supported (Z-Image LoRAs target linear layers)"),
)

# Other models' LoRAs, recognised by module names Z-Image does not have. Checked in this order: names only one model
# family has first, then the Stable Diffusion UNet (whose blocks also hold transformer_blocks.N.ff), then the looser
# MMDiT / Wan / Lumina names, last a CLIP text encoder alone (SD, SDXL and Flux LoRAs all carry one).
_DISTINCT_MODELS = (
    (r"(^|[._])(img_mlp|txt_mlp|img_mod|txt_mod)([._]|$)", "Qwen-Image"),
    (r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d", "Flux"),
    (r"(^|[._])joint_blocks[._]\d", "Stable Diffusion 3"),
)
_UNET = r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)([._]|$)"
_SDXL = r"lora_te2_|(^|\.)text_encoder_2\.|(^|\.)conditioner\.embedders|transformer_blocks[._][1-9]|add_embedding"
_LOOSE_MODELS = (
    (r"(^|[._])transformer_blocks[._]\d+[._](attn|ff|ff_context|norm1|norm1_context)[._]",
     "Flux (or another MMDiT model such as SD3)"),
    (r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn)[._]", "Wan"),
    (r"(^|[._])layers[._]\d+[._](attn[._]to_|feed_forward[._]linear_)", "Lumina-Image 2.0"),
    (r"lora_te1?_text_model|(^|[._])text_model[._]encoder", "Stable Diffusion, SDXL or Flux (a CLIP text encoder)"),
)

# Transformer module names. Per block (layers.N, noise_refiner.N, context_refiner.N): name as written -> (zimage
# name, spelling: "" zimage's own, "original" the original / ComfyUI checkpoint's, "dot" the dot files' to.q).
# "attention.qkv" is the fused q/k/v (that name is kept: the reader splits it).
_BLOCK_LEAVES = {
    "attention.to_q": ("attention.to_q", ""),
    "attention.to_k": ("attention.to_k", ""),
    "attention.to_v": ("attention.to_v", ""),
    "attention.to_out.0": ("attention.to_out.0", ""),
    "feed_forward.w1": ("feed_forward.w1", ""),
    "feed_forward.w2": ("feed_forward.w2", ""),
    "feed_forward.w3": ("feed_forward.w3", ""),
    "adaLN_modulation.0": ("adaLN_modulation.0", ""),
    "attention.to.q": ("attention.to_q", "dot"),
    "attention.to.k": ("attention.to_k", "dot"),
    "attention.to.v": ("attention.to_v", "dot"),
    "attention.out": ("attention.to_out.0", "original"),
    "attention.qkv": ("attention.qkv", "original"),
}
_TOP = {
    "all_x_embedder.2-1": ("all_x_embedder.2-1", ""),
    "all_final_layer.2-1.linear": ("all_final_layer.2-1.linear", ""),
    "all_final_layer.2-1.adaLN_modulation.1": ("all_final_layer.2-1.adaLN_modulation.1", ""),
    "cap_embedder.1": ("cap_embedder.1", ""),
    "t_embedder.mlp.0": ("t_embedder.mlp.0", ""),
    "t_embedder.mlp.2": ("t_embedder.mlp.2", ""),
    "x_embedder": ("all_x_embedder.2-1", "original"),
    "final_layer.linear": ("all_final_layer.2-1.linear", "original"),
    "final_layer.adaLN_modulation.1": ("all_final_layer.2-1.adaLN_modulation.1", "original"),
}
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)$")
_BLOCK_U = re.compile(r"^(layers|noise_refiner|context_refiner)_(\d+)_(.+)$")
# Underscored spellings -> dotted (first wins: the zimage spelling is listed before the dot-file alias).
_BLOCK_LEAVES_U = {}
for _k in _BLOCK_LEAVES:
    _BLOCK_LEAVES_U.setdefault(_k.replace(".", "_"), _k)
_TOP_U = {k.replace(".", "_"): k for k in _TOP}

# Text encoder (Qwen3) module names: layers.N.self_attn.{q,k,v,o}_proj, layers.N.mlp.{gate,up,down}_proj. A leading
# "model." (Qwen3ForCausalLM wraps Qwen3Model as .model) is accepted and dropped.
_TE = re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")
_TE_U = re.compile(r"^(?:model_)?layers_(\d+)_(self_attn_[qkvo]_proj|mlp_(?:gate|up|down)_proj)$")

EXPECTED = {
    TRANSFORMER: "expected names like layers.N.attention.to_q (to_k, to_v, to_out.0), layers.N.feed_forward.w1 "
                 "(w2, w3), layers.N.adaLN_modulation.0, noise_refiner.N.*, context_refiner.N.*, all_x_embedder.2-1, "
                 "all_final_layer.2-1.linear, cap_embedder.1, t_embedder.mlp.0, or the ComfyUI names "
                 "attention.qkv, attention.out, x_embedder, final_layer.linear",
    TEXT_ENCODER: "expected names like layers.N.self_attn.q_proj (k_proj, v_proj, o_proj), layers.N.mlp.gate_proj "
                  "(up_proj, down_proj)",
}
NETWORK_WORDS = {TRANSFORMER: "the Z-Image transformer", TEXT_ENCODER: "the Z-Image text encoder (Qwen3)"}


@dataclass(frozen=True)
class ParsedKey:
    key: str  # as in the file
    role: str  # "down", "up" or "alpha"
    style: str  # "A/B", "peft-default", "down/up", "dot"; "" for an alpha
    prefix: str  # the prefix found, "" for none
    network: str  # TRANSFORMER or TEXT_ENCODER
    module: str  # zimage's module name; "<block>.attention.qkv" for a fused q/k/v
    spelling: str  # "" zimage's names, "original" the original / ComfyUI names (attention.out, qkv, x_embedder),
    #                "dot" the dot files' attention.to.q
    pair: str  # the key less its role suffix: the down and up weights of one factor share it

    @property
    def original_names(self) -> bool:
        return self.spelling == "original"

    @property
    def fused_qkv(self) -> bool:
        return self.module.endswith(".attention.qkv")


def parse_key(path, key: str) -> ParsedKey:
    """One key -> what it is; LoraError naming the key and what was expected for anything else."""
    for pattern, reason in UNSUPPORTED:
        if re.search(pattern, key):
            raise LoraError(path, reason, key)
    for suffix, role, style in SUFFIXES:
        if key.endswith(suffix):
            break
    else:
        raise LoraError(path, "is not a LoRA weight: expected a key ending in .lora_A.weight / .lora_B.weight, "
                              ".lora_down.weight / .lora_up.weight (+ .alpha), .lora_A.default.weight or "
                              ".lora.down.weight / .lora.up.weight", key)
    body = key[: -len(suffix)]
    prefix, network, written = "", None, "dotted"
    for p, net, sp in PREFIXES:
        if body.startswith(p):
            prefix, network, written, body = p, net, sp, body[len(p):]
            break
    if prefix == "base_model.model.":  # PEFT around a pipeline component: the component name may follow
        for p, net in (("transformer.", TRANSFORMER), ("text_encoder.", TEXT_ENCODER)):
            if body.startswith(p):
                prefix, network, body = prefix + p, net, body[len(p):]
    found = _module(body, network, written)
    if found is None:
        nets = [network] if network else [TRANSFORMER, TEXT_ENCODER]
        where = " or ".join(NETWORK_WORDS[n] for n in nets)
        raise LoraError(path, f"module {body!r} matches no module of {where}; "
                              f"{'; '.join(EXPECTED[n] for n in nets)}", key)
    net, module, spelling = found
    return ParsedKey(key, role, style, prefix, net, module, spelling, key[: -len(suffix)])


def _module(body: str, network: str | None, written: str):
    """(network, zimage module name, spelling) for a module path, or None."""
    if network in (None, TRANSFORMER):
        found = _transformer_module(body, written)
        if found is not None:
            return (TRANSFORMER, *found)
    if network in (None, TEXT_ENCODER):
        found = _text_encoder_module(body, written)
        if found is not None:
            return TEXT_ENCODER, found, ""
    return None


def _transformer_module(body: str, written: str):
    if written == "underscored":
        m = _BLOCK_U.match(body)
        if m:
            leaf = _BLOCK_LEAVES_U.get(m.group(3))
            body = f"{m.group(1)}.{m.group(2)}.{leaf}" if leaf else ""
        else:
            body = _TOP_U.get(body, "")
    m = _BLOCK.match(body)
    if m:
        leaf = _BLOCK_LEAVES.get(m.group(3))
        return None if leaf is None else (f"{m.group(1)}.{m.group(2)}.{leaf[0]}", leaf[1])
    return _TOP.get(body)


def _text_encoder_module(body: str, written: str):
    m = (_TE_U if written == "underscored" else _TE).match(body)
    if not m:
        return None
    leaf = m.group(2)
    if written == "underscored":
        leaf = leaf.replace("self_attn_", "self_attn.", 1).replace("mlp_", "mlp.", 1)
    return f"layers.{int(m.group(1))}.{leaf}"


def other_model(keys) -> tuple[str, str] | None:
    """(model, first key that shows it) when the keys belong to another model's LoRA, else None."""
    def first(pattern):
        return next((k for k in keys if re.search(pattern, k)), None)

    for pattern, model in _DISTINCT_MODELS:
        if key := first(pattern):
            return model, key
    if key := first(_UNET):
        return ("SDXL" if first(_SDXL) else "Stable Diffusion (SD 1.x/2.x, or SDXL: a UNet)"), key
    for pattern, model in _LOOSE_MODELS:
        if key := first(pattern):
            return model, key
    return None
