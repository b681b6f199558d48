"""The Qwen3 text encoder of Z-Image, in plain torch: transformers' `Qwen3Model` cut after a given layer.

Importing transformers costs seconds (package probes, sklearn, torch._dynamo); the pipeline only needs the hidden
states of one layer of the text encoder, so this module re-implements exactly that with the same parameter names
(the keys of `Qwen3Model.state_dict()` for the kept layers) and the same op order, so outputs match transformers to
fp32 rounding, and closely in bf16:

    config = json.load(open("text_encoder/config.json"))
    with torch.device("meta"):  # no random init
        encoder = Qwen3TextEncoder(config, num_layers=config["num_hidden_layers"] - 1)
    encoder.load_state_dict(state, strict=True, assign=True)  # state: without norm.* and the dropped layers
    hidden = encoder(input_ids, attention_mask)  # (B, L, hidden) == hidden_states[num_layers] of Qwen3Model

Z-Image reads `hidden_states[-2]` of the full model (the output of layer L-2, before the final norm), which is
`Qwen3TextEncoder(config, L - 1)`. There is no final norm and no cache (the encoder runs once per prompt batch).

Sources reproduced (transformers 5.x): models/qwen3/modeling_qwen3.py (Qwen3RMSNorm, Qwen3MLP, rotary embedding
with rope_type "default", rotate_half / apply_rotary_pos_emb, Qwen3Attention, Qwen3DecoderLayer, Qwen3Model.forward),
integrations/sdpa_attention.py (repeat_kv + scaled_dot_product_attention) and masking_utils.py (causal + padding
mask, or SDPA's is_causal when nothing is padded).
No buffers: the rotary frequencies are computed in forward from the config (fp32, on the CPU, as transformers builds
its `inv_freq` buffer, cached per device in a plain attribute), so meta construction + `assign=True` loading leaves
nothing uninitialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_DEFAULT_ROPE_THETA = 10_000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


def _rope_theta(config: dict) -> float:
    """The rope base, wherever a config.json keeps it; only the "default" (unscaled) rope is supported.

    transformers 4.x saves `rope_theta` (+ `rope_scaling`, usually null); 5.x saves `rope_parameters:
    {"rope_theta": ..., "rope_type": "default"}`. As transformers does, `rope_scaling` wins over `rope_parameters`,
    and the base inside them wins over a top-level `rope_theta`.
    """
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope parameters must be a JSON object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
    theta = rope.get("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA))
    if theta is None:
        theta = _DEFAULT_ROPE_THETA
    return float(theta)


class Qwen3RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back to x's dtype, then times the weight (in that order, as transformers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Qwen3MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (the GPT-NeoX / Llama rope convention)."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, KV, L, hd) -> (B, KV * n_rep, L, hd), each kv head repeated n_rep times in a row (GQA)."""
    if n_rep == 1:
        return x
    b, kv, seq, hd = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, seq, hd).reshape(b, kv * n_rep, seq, hd)


class Qwen3Attention(nn.Module):
    """GQA self-attention with per-head RMSNorm on q and k (before rope), rope, SDPA, output projection."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, eps: float, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self.q_norm = Qwen3RMSNorm(head_dim, eps)  # over head_dim only, per head
        self.k_norm = Qwen3RMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        # x (B, L, D); cos, sin (L, hd) in x's dtype; mask (B, 1, L, L) bool (True = attend) or None = causal only
        b, seq, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, seq, -1, self.head_dim)).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_norm(self.k_proj(x).view(b, seq, -1, self.head_dim)).transpose(1, 2)  # (B, KV, L, hd)
        v = self.v_proj(x).view(b, seq, -1, self.head_dim).transpose(1, 2)  # (B, KV, L, hd)
        q = (q * cos) + (rotate_half(q) * sin)  # cos/sin broadcast over (B, heads)
        k = (k * cos) + (rotate_half(k) * sin)
        n_rep = self.num_heads // self.num_kv_heads
        k = repeat_kv(k, n_rep)  # (B, H, L, hd); transformers repeats too whenever a mask is passed
        v = repeat_kv(v, n_rep)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.scaling, is_causal=mask is None and seq > 1
        )  # (B, H, L, hd)
        out = out.transpose(1, 2).reshape(b, seq, -1)  # (B, L, H * hd)
        return self.o_proj(out)  # (B, L, D)


class Qwen3DecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.self_attn = Qwen3Attention(
            cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
            cfg["rms_norm_eps"], cfg["attention_bias"],
        )
        self.mlp = Qwen3MLP(cfg["hidden_size"], cfg["intermediate_size"])
        self.input_layernorm = Qwen3RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.post_attention_layernorm = Qwen3RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None):
        # h (B, L, D) -> (B, L, D)
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3TextEncoder(nn.Module):
    """Layers 0..num_layers-1 of a Qwen3Model, no final norm: forward gives `hidden_states[num_layers]`.

    `config` is the dict of a Qwen3 text_encoder/config.json. Unsupported settings (an activation other than
    silu, scaled rope, sliding-window layers) raise ValueError naming the value. Parameters (no buffers):
    embed_tokens.weight, layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ .bias with attention_bias),
    layers.{i}.self_attn.{q,k}_norm.weight, layers.{i}.mlp.{gate,up,down}_proj.weight,
    layers.{i}.input_layernorm.weight, layers.{i}.post_attention_layernorm.weight.
    """

    def __init__(self, config: dict, num_layers: int):
        super().__init__()
        cfg = self._parse(config, num_layers)
        self.config = dict(config)
        self.num_layers = num_layers
        self.hidden_size = cfg["hidden_size"]
        self.head_dim = cfg["head_dim"]
        self.rope_theta = cfg["rope_theta"]
        # An explicit (uninitialised) weight: Embedding's own normal_ init, run on the meta device, goes through
        # torch._refs and imports torch._dynamo (1.5-5 s of cold start); the checkpoint overwrites it anyway.
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"],
                                         _weight=torch.empty(cfg["vocab_size"], cfg["hidden_size"]))
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(num_layers))
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # plain attribute, not a buffer: see _rope

    @staticmethod
    def _parse(config: dict, num_layers: int) -> dict:
        """The values the modules need, with transformers' Qwen3Config defaults, checked."""
        try:
            cfg = {
                "hidden_size": int(config["hidden_size"]),
                "intermediate_size": int(config["intermediate_size"]),
                "num_attention_heads": int(config["num_attention_heads"]),
                "vocab_size": int(config["vocab_size"]),
                "rms_norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            }
        except KeyError as e:
            raise ValueError(f"text encoder config has no {e.args[0]!r}") from None
        kv = config.get("num_key_value_heads")
        cfg["num_key_value_heads"] = int(kv) if kv is not None else cfg["num_attention_heads"]
        cfg["head_dim"] = int(config.get("head_dim") or 128)  # Qwen3Config's default (not hidden / heads)
        cfg["attention_bias"] = bool(config.get("attention_bias", False))
        cfg["rope_theta"] = _rope_theta(config)
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
            raise ValueError(
                f"num_attention_heads={cfg['num_attention_heads']} is not a multiple of "
                f"num_key_value_heads={cfg['num_key_value_heads']}"
            )
        if cfg["head_dim"] % 2:
            raise ValueError(f"head_dim={cfg['head_dim']} must be even for rope")
        total = config.get("num_hidden_layers")
        if not 1 <= num_layers <= (total if total is not None else num_layers):
            raise ValueError(f"num_layers={num_layers} must be in 1..num_hidden_layers={total}")
        layer_types = config.get("layer_types") or []
        if config.get("use_sliding_window") or "sliding_attention" in layer_types[:num_layers]:
            raise ValueError("sliding-window attention layers are not supported (use_sliding_window must be false)")
        return cfg

    def _rope(self, seq: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (L, hd) for positions 0..L-1: computed in fp32, then cast to `dtype` (as transformers)."""
        inv_freq = self._inv_freq.get(device)
        if inv_freq is None:
            # Exactly transformers' compute_default_rope_parameters, on the CPU as it builds its buffer at init.
            dim = self.head_dim
            inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
            inv_freq = inv_freq.to(device)  # (hd/2,)
            self._inv_freq[device] = inv_freq
        positions = torch.arange(seq, device=device).float()  # (L,)
        freqs = positions[:, None] * inv_freq  # (L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, seq: int, device: torch.device) -> torch.Tensor | None:
        """None (SDPA's is_causal) when nothing is padded, else (B, 1, L, L) bool: causal and key not padding.

        As transformers, an all-ones mask is dropped (one host sync), so unpadded batches use the same SDPA kernel.
        Each position also sees itself, so a padded query row is never empty (no NaN there); real rows see only
        real keys anyway (right padding: a real query's own position is real).
        """
        if attention_mask is None:
            return None
        keep = attention_mask.to(device=device, dtype=torch.bool)  # (B, L)
        if bool(keep.all()):
            return None
        pos = torch.arange(seq, device=device)
        causal = pos[:, None] >= pos[None, :]  # (L, L)
        mask = causal[None, :, :] & keep[:, None, :]  # (B, L, L)
        mask = mask | (pos[:, None] == pos[None, :])
        return mask[:, None, :, :]  # (B, 1, L, L)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) long; attention_mask (B, L) bool/int, 1 = real token, right padding.

        Returns (B, L, hidden) in the weights' dtype: the output of layer num_layers-1. Padded positions hold
        values that mean nothing.
        """
        seq = input_ids.shape[1]
        h = self.embed_tokens(input_ids)  # (B, L, D)
        cos, sin = self._rope(seq, h.device, h.dtype)  # (L, hd) each
        mask = self._mask(attention_mask, seq, h.device)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return h

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, head_dim={self.head_dim}, rope_theta={self.rope_theta}"
