"""describe: what `zimage lora inspect FILE` shows, as a JSON-able dict (format, networks, ranks, alphas, targets
grouped by block range, hashes, the trainer's metadata)."""

from __future__ import annotations

import re

from zimage.weights.lora.model import NETWORKS, LoraFactor, LoraFile

# Leaf order within a block, as the model defines them (so that "to_q/to_k/to_v/to_out.0" reads naturally).
_LEAF_ORDER = (
    "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
    "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0",
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
_BLOCK = re.compile(r"^(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)$")
_MAX_METADATA_CHARS = 200  # longer values (tag frequencies, dataset JSON, thumbnails) are left out of the summary


def describe(lora: LoraFile) -> dict:
    """A summary of `lora` for people: every value a str, number, list or dict."""
    out = {
        "name": lora.name, "path": str(lora.path), "format": lora.format,
        "sha256": lora.sha256, "addnet_hash": lora.addnet_hash, "short_hash": lora.short_hash,
        "networks": {net: _network(factors) for net, factors in lora.networks.items()},
    }
    trainer = {k: v for k, v in sorted(lora.metadata.items())
               if k.startswith(("ss_", "modelspec.")) and len(v) <= _MAX_METADATA_CHARS}
    if trainer:
        out["trainer"] = trainer
    if lora.peft_config is not None:
        out["peft_config"] = _peft_summary(lora.peft_config)
    if lora.notes:
        out["notes"] = list(lora.notes)
    return out


def _peft_summary(config: dict) -> dict:
    """The scaling-relevant entries; per network for diffusers' component-prefixed lora_adapter_metadata."""
    keep = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "base_model_name_or_path")
    nets = {k.split(".", 1)[0] for k in config if "." in k and k.split(".", 1)[0] in NETWORKS}
    if not nets:
        return {k: config[k] for k in keep if k in config}
    return {net: {k: config[f"{net}.{k}"] for k in keep if f"{net}.{k}" in config} for net in sorted(nets)}


def _network(factors: dict[str, LoraFactor]) -> dict:
    return {
        "modules": len(factors),
        "ranks": sorted({f.rank for f in factors.values()}),
        "alphas": sorted({f.alpha for f in factors.values() if f.alpha is not None}),
        "scales": sorted({round(f.scale, 6) for f in factors.values()}),
        "parameters": sum(f.down.numel() + f.up.numel() for f in factors.values()),
        "targets": group_targets(factors),
    }


def group_targets(modules) -> list[str]:
    """Module names -> lines like "layers.0-29: attention.to_q/to_k/to_v/to_out.0, feed_forward.w1/w2/w3"; blocks
    with the same leaves share a line, names outside blocks are listed as they are."""
    blocks: dict[str, dict[str, set[int]]] = {}  # block kind -> leaf -> indices
    single = []
    for name in modules:
        m = _BLOCK.match(name)
        if m:
            blocks.setdefault(m.group(1), {}).setdefault(m.group(3), set()).add(int(m.group(2)))
        else:
            single.append(name)
    lines = []
    for kind in ("layers", "noise_refiner", "context_refiner"):
        by_indices: dict[tuple[int, ...], list[str]] = {}
        for leaf, indices in blocks.get(kind, {}).items():
            by_indices.setdefault(tuple(sorted(indices)), []).append(leaf)
        for indices, leaves in sorted(by_indices.items()):
            lines.append(f"{kind}.{_ranges(indices)}: {_leaves(leaves)}")
    return lines + sorted(single)


def _ranges(indices: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> "0-2,5,7-8"."""
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)


def _leaves(leaves: list[str]) -> str:
    """["attention.to_q", "attention.to_k", "feed_forward.w1"] -> "attention.to_q/to_k, feed_forward.w1"."""
    order = {leaf: i for i, leaf in enumerate(_LEAF_ORDER)}
    families: dict[str, list[str]] = {}
    for leaf in sorted(leaves, key=lambda x: (order.get(x, len(order)), x)):
        family, _, rest = leaf.partition(".")
        families.setdefault(family, []).append(rest)
    return ", ".join(f"{family}.{'/'.join(rests)}" if rests[0] else family for family, rests in families.items())
