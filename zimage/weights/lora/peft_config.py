"""PEFT's LoRA config (adapter_config.json, or diffusers' `lora_adapter_metadata` in the safetensors header): the
scale of each module, as PEFT's LoraLayer.update_layer computes it.

For a module named M (as PEFT names it: the path in the file, less "base_model.model." and the component prefix):
    r     = rank_pattern[first pattern P with re.match(rf"(.*\\.)?({P})$", M)]  else config r
    alpha = alpha_pattern[same rule]                                           else config lora_alpha
    scale = alpha / sqrt(r) with use_rslora, else alpha / r
The file's tensors must have rank r (PEFT builds the layer with r and loads the tensors into it).

diffusers writes `lora_adapter_metadata` either unprefixed (ModelMixin.save_lora_adapter: one component's config)
or with each key prefixed by the component ("transformer.r", "text_encoder.lora_alpha": save_lora_weights).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from zimage.weights.lora.model import NETWORKS, LoraError

# Options that change what the adapter computes beyond scale * B @ A on linear layers: refused by name.
_REFUSED = {
    "use_dora": "DoRA is not supported, only plain LoRA",
    "lora_bias": "LoRA biases (lora_bias=True) are not supported",
    "use_qalora": "QALoRA is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "layer_replication": "layer_replication changes the model's layers: not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "arrow_config": "Arrow routing is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "modules_to_save": "fully trained modules (modules_to_save) are not supported, only LoRA",
}


@dataclass(frozen=True)
class PeftScaling:
    r: int
    lora_alpha: float
    rank_pattern: dict
    alpha_pattern: dict
    use_rslora: bool

    def scale(self, path, key: str, module: str, rank: int) -> tuple[float, float]:
        """(scale, alpha) for `module` (PEFT's name) whose tensors have rank `rank`; LoraError on a mismatch."""
        pr, pa = _pattern(self.rank_pattern, module), _pattern(self.alpha_pattern, module)
        r = int(self.rank_pattern[pr]) if pr else self.r
        alpha = float(self.alpha_pattern[pa]) if pa else float(self.lora_alpha)
        if r != rank:
            raise LoraError(path, f"has rank {rank} but the PEFT config gives r={r} for module {module!r} "
                                  "(r / rank_pattern): the file and its config disagree", key)
        return (alpha / math.sqrt(rank) if self.use_rslora else alpha / rank), alpha


def _pattern(patterns: dict, module: str) -> str | None:
    """PEFT's get_pattern_key: the first pattern that matches the end of `module` at a "." boundary."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module):
            return p
    return None


def parse_config(path, config: dict) -> PeftScaling:
    """A plain (unprefixed) LoRA config -> its scaling; LoraError for what we do not apply."""
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoraError(path, f"is a PEFT {peft_type} adapter (peft_type={config.get('peft_type')!r}): only LORA "
                              "is supported")
    for name, why in _REFUSED.items():
        if config.get(name) not in (None, False, [], {}, ""):
            raise LoraError(path, f"its PEFT config sets {name}={config[name]!r}: {why}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq")):
        raise LoraError(path, f"its PEFT config says init_lora_weights={init!r}: such an adapter is only valid on "
                              "base weights that its initialisation changed; convert it to a plain LoRA with PEFT "
                              "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    if config.get("bias", "none") != "none":
        raise LoraError(path, f"its PEFT config sets bias={config['bias']!r}: trained biases are not supported "
                              "(only bias='none')")
    try:
        r = int(config.get("r", 8))  # LoraConfig's defaults: r=8, lora_alpha=8
        alpha = float(config.get("lora_alpha", 8))
        rank_pattern = dict(config.get("rank_pattern") or {})
        alpha_pattern = dict(config.get("alpha_pattern") or {})
    except (TypeError, ValueError) as e:
        raise LoraError(path, f"its PEFT config has an invalid r / lora_alpha / rank_pattern / alpha_pattern: {e}"
                        ) from None
    return PeftScaling(r, alpha, rank_pattern, alpha_pattern, bool(config.get("use_rslora", False)))


def split_metadata_config(path, config: dict) -> dict[str | None, dict]:
    """diffusers' lora_adapter_metadata -> {network: config}, or {None: config} for an unprefixed one (all)."""
    prefixed = {k for k in config if "." in k and k.split(".", 1)[0] in NETWORKS}
    if not prefixed:
        return {None: config}
    if prefixed != set(config):
        raise LoraError(path, "its lora_adapter_metadata mixes component-prefixed and plain keys: "
                              f"{sorted(set(config) - prefixed)[:3]}")
    out: dict[str | None, dict] = {}
    for k, v in config.items():
        net, name = k.split(".", 1)
        out.setdefault(net, {})[name] = v
    return out
