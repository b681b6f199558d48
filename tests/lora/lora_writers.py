"""Test helpers: write one LoRA (a set of factors) in each on-disk layout Z-Image LoRAs ship in.

A LoRA here is {zimage module name: F(down (r, in), up (out, r), alpha or None)} whose update is
scale * up @ down, scale = alpha / r (1 when alpha is None). Each writer stores that same update in its layout:
layouts that carry an alpha store it as an `.alpha` key; layouts that carry none (DiffSynth, plain diffusers files,
ai-toolkit without alphas) fold the scale into `up`, as diffusers does when it converts. `expected_deltas` is the
ground truth the tests compare every reading with.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file


class F(NamedTuple):
    down: torch.Tensor  # (r, in)
    up: torch.Tensor  # (out, r)
    alpha: float | None  # None: scale 1


def scale_of(f: F) -> float:
    return 1.0 if f.alpha is None else f.alpha / f.down.shape[0]


def expected_deltas(lora: dict[str, F]) -> dict[str, torch.Tensor]:
    return {m: (f.up.double() @ f.down.double() * scale_of(f)).float() for m, f in lora.items()}


def random_lora(shapes: dict[str, tuple[int, int]], rank: int = 4, alpha: float | None = 8.0, seed: int = 0,
                ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None) -> dict[str, F]:
    """Random factors for every module of `shapes` ({name: (out, in)}), rank/alpha overridable per module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (o, i) in sorted(shapes.items()):
        r = (ranks or {}).get(m, rank)
        out[m] = F(torch.randn(r, i, generator=g) * 0.2, torch.randn(o, r, generator=g) * 0.2,
                   (alphas or {}).get(m, alpha))
    return out


def _folded(f: F) -> tuple[torch.Tensor, torch.Tensor]:
    return f.down.contiguous(), (f.up * scale_of(f)).contiguous()


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _alpha(value: float) -> torch.Tensor:
    return torch.tensor(float(value))


def write_diffusers(path, lora: dict[str, F], prefix: str = "transformer.", metadata: dict | None = None) -> Path:
    """diffusers / PEFT state dict: PREFIX + module + .lora_A.weight / .lora_B.weight, scale folded into B."""
    t = {}
    for m, f in lora.items():
        down, up = _folded(f)
        t[f"{prefix}{m}.lora_A.weight"], t[f"{prefix}{m}.lora_B.weight"] = down, up
    return _save(path, t, metadata)


def write_peft_dir(folder, lora: dict[str, F], use_rslora: bool = False, extra_config: dict | None = None) -> Path:
    """A PEFT folder as PeftModel.save_pretrained writes it: adapter_config.json with r / lora_alpha (the most
    common values) and rank_pattern / alpha_pattern for the others, base_model.model.* keys, factors unscaled."""
    import json

    folder = Path(folder)
    ranks = {m: f.down.shape[0] for m, f in lora.items()}
    alphas = {m: (f.alpha if f.alpha is not None else ranks[m]) for m, f in lora.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    a = Counter(alphas.values()).most_common(1)[0][0]
    config = {"peft_type": "LORA", "r": r, "lora_alpha": a, "use_rslora": use_rslora,
              "rank_pattern": {f"^{m}": v for m, v in ranks.items() if v != r},
              "alpha_pattern": {f"^{m}": v for m, v in alphas.items() if v != a},
              "target_modules": sorted(lora), "bias": "none", **(extra_config or {})}
    t = {}
    for m, f in lora.items():
        t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"] = f.down, f.up
    _save(folder / "adapter_model.safetensors", t, {"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_kohya(path, lora: dict[str, F], prefix: str = "lora_unet_", metadata: dict | None = None) -> Path:
    """kohya sd-scripts / musubi-tuner: PREFIX + module with "." -> "_", .lora_down / .lora_up + .alpha (alpha =
    rank where the LoRA has none, kohya's meaning of "no scaling")."""
    t = {}
    for m, f in lora.items():
        name = prefix + m.replace(".", "_")
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = f.down, f.up
        t[f"{name}.alpha"] = _alpha(f.alpha if f.alpha is not None else f.down.shape[0])
    return _save(path, t, metadata)


def write_ai_toolkit(path, lora: dict[str, F], alphas: bool = False) -> Path:
    """ostris ai-toolkit: diffusion_model. + module + .lora_A / .lora_B, with .alpha keys (some versions) or the
    scale folded (others)."""
    t = {}
    for m, f in lora.items():
        if alphas:
            t[f"diffusion_model.{m}.lora_A.weight"], t[f"diffusion_model.{m}.lora_B.weight"] = f.down, f.up
            t[f"diffusion_model.{m}.alpha"] = _alpha(f.alpha if f.alpha is not None else f.down.shape[0])
        else:
            t[f"diffusion_model.{m}.lora_A.weight"], t[f"diffusion_model.{m}.lora_B.weight"] = _folded(f)
    return _save(path, t)


def write_diffsynth(path, lora: dict[str, F]) -> Path:
    """DiffSynth-Studio: bare module + .lora_A.default.weight / .lora_B.default.weight, no alpha (scale folded)."""
    t = {}
    for m, f in lora.items():
        t[f"{m}.lora_A.default.weight"], t[f"{m}.lora_B.default.weight"] = _folded(f)
    return _save(path, t)


def dot_name(module: str) -> str:
    """The dot files' spelling: attention.to_q -> attention.to.q (to_out.0 and the rest unchanged)."""
    for p in "qkv":
        module = module.replace(f".attention.to_{p}", f".attention.to.{p}")
    return module


def write_dot(path, lora: dict[str, F], prefix: str = "") -> Path:
    """Community "dot" files (Anime-Z style): module with to.q/to.k/to.v + .lora.down.weight / .lora.up.weight,
    alphas under the diffusers spelling (module.alpha)."""
    t = {}
    for m, f in lora.items():
        name = prefix + dot_name(m)
        t[f"{name}.lora.down.weight"], t[f"{name}.lora.up.weight"] = f.down, f.up
        t[f"{prefix}{m}.alpha"] = _alpha(f.alpha if f.alpha is not None else f.down.shape[0])
    return _save(path, t)


# zimage name -> original / ComfyUI checkpoint name (besides to_q/to_k/to_v, which fuse into attention.qkv)
ORIGINAL_NAMES = {
    "attention.to_out.0": "attention.out",
    "all_x_embedder.2-1": "x_embedder",
    "all_final_layer.2-1.linear": "final_layer.linear",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
}


def original_name(module: str) -> str:
    for ours, theirs in ORIGINAL_NAMES.items():
        if module == ours or module.endswith("." + ours):
            return module[: len(module) - len(ours)] + theirs
    return module


def fuse_qkv(q: F, k: F, v: F) -> F:
    """Three LoRAs on to_q/to_k/to_v -> one on the fused qkv with the same update (musubi-tuner's ComfyUI export):
    down = cat of the downs (Rq+Rk+Rv, in), up = block-diagonal (3 * dim, Rq+Rk+Rv), each part's scale folded
    into its block, alpha = total rank (scale 1)."""
    downs = [f.down for f in (q, k, v)]
    ups = [f.up * scale_of(f) for f in (q, k, v)]
    down = torch.cat(downs, 0)
    return F(down, torch.block_diag(*ups), float(down.shape[0]))


def comfy_fused(lora: dict[str, F]) -> dict[str, F]:
    """The LoRA with original / ComfyUI module names: q/k/v of each block fused, attention.out, x_embedder, ..."""
    out, blocks = {}, {}
    for m, f in lora.items():
        for p in ("to_q", "to_k", "to_v"):
            if m.endswith(f".attention.{p}"):
                blocks.setdefault(m[: -len(f".attention.{p}")], {})[p] = f
                break
        else:
            out[original_name(m)] = f
    for block, parts in blocks.items():
        out[f"{block}.attention.qkv"] = fuse_qkv(parts["to_q"], parts["to_k"], parts["to_v"])
    return out


def write_comfy_fused(path, lora: dict[str, F], prefix: str = "diffusion_model.", underscored: bool = False) -> Path:
    """ComfyUI / original names with fused q/k/v, kohya suffixes + .alpha. prefix "diffusion_model." (dotted, as
    ComfyUI keys), or underscored with "lora_unet_" (musubi-tuner's convert_z_image_lora_to_comfy output)."""
    t = {}
    for m, f in comfy_fused(lora).items():
        name = prefix + (m.replace(".", "_") if underscored else m)
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = f.down, f.up
        t[f"{name}.alpha"] = _alpha(f.alpha if f.alpha is not None else f.down.shape[0])
    return _save(path, t)
