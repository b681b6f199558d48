"""read_lora: any Z-Image LoRA file or PEFT folder -> LoraFile, every key accounted for, nothing applied.

Scaling (what multiplies up @ down), per factor, the same product as diffusers' conversion + PEFT:
- the file has an `.alpha` for the module (kohya, musubi, ai-toolkit, dot files): alpha / rank, rank = down rows
  (diffusers' `_convert_non_diffusers_z_image_lora_to_diffusers` folds exactly this into the weights; ComfyUI
  computes alpha / down.shape[0] too);
- a PEFT config applies (adapter_config.json of a PEFT folder, or diffusers' lora_adapter_metadata in the header)
  and the keys are lora_A / lora_B: PEFT's lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, per module
  through rank_pattern / alpha_pattern (zimage.weights.lora.peft_config);
- neither: 1.0 (PEFT's and diffusers' convention for a bare lora_A / lora_B file, DiffSynth's, kohya's for a
  missing alpha).
An alpha key together with a PEFT config for the same module is refused as ambiguous (diffusers would apply both).

A fused `attention.qkv` LoRA (ComfyUI's module; musubi-tuner's ComfyUI export) becomes three factors on to_q, to_k,
to_v that share `down` and take row thirds of `up`, the scale alpha / (rank of the fused pair): what ComfyUI's
slice patch computes. Where a third of `up` is zero outside some rank columns (musubi's block-diagonal export), the
factor keeps only the other columns: the same product, a third of the rank.
A file that carries one module twice (Anime-Z-style files: `attention.qkv` next to to_q/to_k/to_v, `attention.out`
next to `attention.to_out.0`) keeps one copy, the diffusers-named one, if both give the same update (as diffusers
keeps it), and is refused if they differ (ComfyUI would add both; we do not guess).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from zimage.weights.lora import files, names
from zimage.weights.lora.model import LoraError, LoraFactor, LoraFile
from zimage.weights.lora.peft_config import PeftScaling, parse_config, split_metadata_config

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights folder
METADATA_CONFIG = "lora_adapter_metadata"  # diffusers' key in the safetensors __metadata__
_DUPLICATE_RTOL = 1e-3  # two copies of one module "agree" within this fraction of the larger update's max |value|


def read_lora(path, *, name: str | None = None) -> LoraFile:
    """Read and normalise a LoRA: a .safetensors file, a PEFT folder (adapter_config.json + adapter_model
    .safetensors) or a diffusers save_lora_weights folder. LoraError (exit code 2) for anything unusable."""
    path = Path(path)
    weights, config = _locate(path)
    header_len = files.check_safetensors(weights)
    tensors, metadata = files.read_tensors(weights)
    sha256, addnet = files.hashes(weights, header_len)
    scalings: dict[str | None, PeftScaling] = {}
    if config is None and METADATA_CONFIG in metadata:
        try:
            config = json.loads(metadata[METADATA_CONFIG])
        except json.JSONDecodeError as e:
            raise LoraError(path, f"its {METADATA_CONFIG} is not JSON: {e}") from None
        scalings = {net: parse_config(path, c) for net, c in split_metadata_config(path, config).items()}
    elif config is not None:
        scalings = {None: parse_config(path, config)}
    networks, notes, parsed = _normalise(path, tensors, scalings)
    return LoraFile(
        name=name or (path.name if path.is_dir() else path.stem), path=path,
        format=_format(parsed, peft_folder=path.is_dir() and (path / PEFT_CONFIG).is_file()),
        sha256=sha256, addnet_hash=addnet, short_hash=files.short_hash(addnet, metadata), networks=networks,
        metadata=metadata, peft_config=config, notes=tuple(notes),
    )


def _locate(path: Path) -> tuple[Path, dict | None]:
    """(the safetensors file to read, the PEFT config of a PEFT folder or None)."""
    if path.is_file():
        return path, None
    if not path.is_dir():
        raise LoraError(path, "does not exist (expected a .safetensors file or a PEFT adapter folder)")
    if (path / PEFT_CONFIG).is_file():
        weights = path / PEFT_WEIGHTS
        if not weights.is_file():
            pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
            raise LoraError(path, f"is a PEFT folder without {PEFT_WEIGHTS}"
                                  + (f" (it has {', '.join(pickled)}: pickles, which zimage never loads; save "
                                     "the adapter with safe_serialization=True)" if pickled else ""))
        try:
            config = json.loads((path / PEFT_CONFIG).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LoraError(path / PEFT_CONFIG, f"cannot be read as JSON: {e}") from None
        if not isinstance(config, dict):
            raise LoraError(path / PEFT_CONFIG, "is not a JSON object")
        return weights, config
    if (path / DIFFUSERS_WEIGHTS).is_file():
        return path / DIFFUSERS_WEIGHTS, None
    raise LoraError(path, f"is a folder but not a LoRA: expected {PEFT_CONFIG} + {PEFT_WEIGHTS} (PEFT) or "
                          f"{DIFFUSERS_WEIGHTS} (diffusers)")


def _normalise(path, tensors: dict[str, torch.Tensor], scalings: dict[str | None, PeftScaling]):
    keys = sorted(tensors)
    other = names.other_model(keys)
    if other is not None:
        model, key = other
        raise LoraError(path, f"this LoRA is for {model}, not Z-Image (Z-Image LoRAs have keys like "
                              "'diffusion_model.layers.0.attention.to_q.lora_A.weight')", key)
    parsed = [names.parse_key(path, k) for k in keys]
    pairs: dict[str, dict[str, names.ParsedKey]] = {}
    alphas_exact: dict[str, names.ParsedKey] = {}
    alphas_by_module: dict[tuple[str, str], list[names.ParsedKey]] = {}
    for p in parsed:
        if p.role == "alpha":
            alphas_exact[p.pair] = p
            alphas_by_module.setdefault((p.network, p.module), []).append(p)
        else:
            pairs.setdefault(p.pair, {})[p.role] = p
    used_alphas: set[str] = set()
    candidates: dict[tuple[str, str], list[tuple[int, LoraFactor]]] = {}
    for pair in sorted(pairs):
        roles = pairs[pair]
        if "down" not in roles or "up" not in roles:
            have, miss = ("down", "up") if "down" in roles else ("up", "down")
            raise LoraError(path, f"has a LoRA {have} weight but no {miss} weight for the same module", roles[have].key)
        d, u = roles["down"], roles["up"]
        down, up = _matrix(path, d.key, tensors[d.key], "down"), _matrix(path, u.key, tensors[u.key], "up")
        if down.shape[0] == 0:
            raise LoraError(path, f"has rank 0 (shape {tuple(down.shape)}): a LoRA down weight is (rank >= 1, in)",
                            d.key)
        if down.shape[0] != up.shape[1]:
            raise LoraError(path, f"rank mismatch: down {tuple(down.shape)} has rank {down.shape[0]} but up "
                                  f"{tuple(up.shape)} ({u.key}) has rank {up.shape[1]}; expected down (rank, in) "
                                  "and up (out, rank)", d.key)
        alpha_key, alpha_keys = _alpha_for(path, d, alphas_exact, alphas_by_module, tensors)
        scale, alpha = _scale(path, d, alpha_key, tensors, scalings, rank=down.shape[0])
        used_alphas.update(alpha_keys)
        if d.fused_qkv:
            block = d.module[: -len(".attention.qkv")]
            for proj, fdown, fup, source in _split_qkv(path, d.key, down, up):
                candidates.setdefault((d.network, f"{block}.attention.{proj}"), []).append(
                    (2, LoraFactor(fdown, fup, scale, d.key, alpha, source)))
        else:
            priority = 1 if d.spelling else 0  # zimage's own spelling first, then "original" / "dot" aliases
            candidates.setdefault((d.network, d.module), []).append(
                (priority, LoraFactor(down.contiguous(), up.contiguous(), scale, d.key, alpha)))
    unused = sorted(p.key for p in alphas_exact.values() if p.key not in used_alphas)
    if unused:
        raise LoraError(path, "is an alpha for a module that has no LoRA down/up weights in the file "
                              "(a leftover key: nothing is dropped silently)", unused[0])
    networks: dict[str, dict[str, LoraFactor]] = {}
    notes: list[str] = []
    for (net, module) in sorted(candidates, key=lambda nm: (nm[0], _natural(nm[1]))):
        kept = _one_copy(path, module, candidates[(net, module)], notes)
        networks.setdefault(net, {})[module] = kept
    return networks, notes, parsed


def _matrix(path, key: str, t: torch.Tensor, role: str) -> torch.Tensor:
    """A down (rank, in) or up (out, rank) weight as fp32; 1x1 conv shapes (r, in, 1, 1) are not linear: refused."""
    if not t.is_floating_point():
        raise LoraError(path, f"has dtype {t.dtype}: a LoRA {role} weight must be floating point", key)
    if t.ndim != 2:
        raise LoraError(path, f"has shape {tuple(t.shape)}: a LoRA {role} weight of a linear layer is 2-D "
                              f"({'(rank, in)' if role == 'down' else '(out, rank)'})", key)
    t = t.to(torch.float32)
    if not torch.isfinite(t).all():
        raise LoraError(path, "holds NaN or infinite values", key)
    return t


def _alpha_for(path, d: names.ParsedKey, exact, by_module, tensors) -> tuple[str | None, list[str]]:
    """(the alpha key that belongs to down key `d`, the alpha keys this accounts for): the alpha spelled like `d`,
    else those of the same module under other spellings, which must then all hold one value."""
    if d.pair in exact:
        return exact[d.pair].key, [exact[d.pair].key]
    found = [p.key for p in by_module.get((d.network, d.module), [])]
    values = {tuple(tensors[k].float().reshape(-1).tolist()) for k in found}
    if len(values) > 1:
        raise LoraError(path, f"has several different alphas for module {d.module!r}: {', '.join(found)}", d.key)
    return (found[0] if found else None), found


def _scale(path, d: names.ParsedKey, alpha_key, tensors, scalings, rank: int) -> tuple[float, float | None]:
    """(scale, alpha) for the factor whose down key is `d` (rules in the module docstring)."""
    scaling = scalings.get(d.network, scalings.get(None)) if d.style in ("A/B", "peft-default") else None
    if alpha_key is not None:
        if scaling is not None:
            raise LoraError(path, "has an .alpha key and a PEFT config (lora_alpha / r) for the same module: which "
                                  "scaling applies is ambiguous", alpha_key)
        t = tensors[alpha_key]
        if t.numel() != 1 or (not t.is_floating_point() and t.dtype not in (torch.int32, torch.int64)):
            raise LoraError(path, f"an alpha must be one number, got shape {tuple(t.shape)} dtype {t.dtype}",
                            alpha_key)
        alpha = float(t.float().reshape(-1)[0])
        if not torch.isfinite(torch.tensor(alpha)):
            raise LoraError(path, f"alpha is {alpha}", alpha_key)
        return alpha / rank, alpha
    if scaling is not None:
        module = d.pair[len(d.prefix):]  # PEFT's own module name (before zimage's renaming)
        return scaling.scale(path, d.key, module, rank)
    return 1.0, None


def _split_qkv(path, key: str, down: torch.Tensor, up: torch.Tensor):
    """Fused q/k/v (up (3 * dim, R), down (R, in)) -> [(proj, down_i, up_i, source)] for to_q, to_k, to_v."""
    if up.shape[0] % 3:
        raise LoraError(path, f"a fused attention.qkv up weight must have 3 * dim rows (q, k, v), got "
                              f"{tuple(up.shape)}", key)
    dim, rank = up.shape[0] // 3, up.shape[1]
    out = []
    for i, proj in enumerate(("to_q", "to_k", "to_v")):
        rows = up[i * dim:(i + 1) * dim]  # (dim, R)
        cols = rows.ne(0).any(0).nonzero().flatten()  # rank columns this third uses
        source = f"fused attention.qkv rows {i * dim}:{(i + 1) * dim}"
        if 0 < len(cols) < rank:  # zero elsewhere (block-diagonal export): the same product at a lower rank
            out.append((proj, down[cols].contiguous(), rows[:, cols].contiguous(),
                        f"{source}, rank columns {cols[0].item()}..{cols[-1].item()} of {rank} (the others are 0)"))
        else:
            out.append((proj, down.contiguous(), rows.contiguous(), source))
    return out


def _one_copy(path, module: str, found: list[tuple[int, LoraFactor]], notes: list[str]) -> LoraFactor:
    """The factor for a module given once or more; a second copy must give the same update (see the docstring)."""
    found = sorted(found, key=lambda pf: (pf[0], pf[1].key))
    kept = found[0][1]
    if len(found) == 1:
        return kept
    ref = kept.delta()
    for _, other in found[1:]:
        diff = (other.delta() - ref).abs().max().item()
        bound = _DUPLICATE_RTOL * max(ref.abs().max().item(), other.delta().abs().max().item(), 1e-12)
        if diff > bound:
            raise LoraError(path, f"gives module {module!r} twice with different updates ({kept.key} and "
                                  f"{other.key}, max difference {diff:.3g}): diffusers would use one, ComfyUI "
                                  "would add both; zimage does not guess", other.key)
        notes.append(f"{module}: {other.key} is a copy of {kept.key} (same update), used once")
    return kept


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _format(parsed: list[names.ParsedKey], peft_folder: bool) -> str:
    """The layout's name, from the spellings seen (informational: every key was mapped on its own)."""
    prefixes = {p.prefix for p in parsed}
    styles = {p.style for p in parsed if p.role != "alpha"}
    if peft_folder:
        return "peft"
    if any(p.fused_qkv for p in parsed):
        return "comfyui-fused-qkv"
    if prefixes & {"lora_unet_", "lora_te_", "lora_te1_", "lora_transformer_"}:
        return "kohya"
    if "lycoris_" in prefixes:
        return "lycoris"
    if "dot" in styles:
        return "lora-dot"
    if "peft-default" in styles:
        return "diffsynth"
    if any(p.original_names for p in parsed) or prefixes & {"model.diffusion_model.",
                                                           "text_encoders.qwen3_4b.transformer."}:
        return "comfyui"
    if "diffusion_model." in prefixes:
        return "ai-toolkit" if "A/B" in styles else "comfyui"
    if any(p.startswith("base_model.model.") for p in prefixes):
        return "peft"
    return "comfyui" if "down/up" in styles else "diffusers"
