"""Runtime LoRA slots in their one-GEMM form for compiled blocks: which layers widen and what that costs.

A widened layer (zimage.models.lora.LoraLinear.widen) keeps its base weight as the left part of one matrix
[W | E] (out, in + P*R), E holding the up factors of the slot the batch's LoRA rows share, so that a compiled batch
with one LoRA set (or none) computes base and delta in one GEMM over [x | x A^T]. Widened: the fused q/k/v and
w1/w3 and the feed-forward's w2 of every block, whose inputs come from elementwise kernels that write the padded
input at no extra cost. Not the attention output (its input is the attention kernel's output, which the pad would
copy) nor the small adaLN and embedder linears. Only under the resident bf16 plan (fused, compiled; fp8 layers
keep their per-row scales); it is never undone: a widened layer computes the same in eager mode.
"""

from __future__ import annotations


def widen_lora_layers(transformer) -> int:
    """Widen the runtime LoRA layers of every fused block of `transformer`; returns how many are widened."""
    from zimage.models.lora import LoraLinear

    count = 0
    for block in transformer.blocks():
        attn, ff = block.attention, block.feed_forward
        for layer in (getattr(attn, "to_qkv", None), getattr(ff, "w13", None), getattr(ff, "w2", None)):
            if isinstance(layer, LoraLinear) and layer.widen():
                count += 1
    return count


def extension_bytes(name: str, out_features: int, rank: int, dtype_bytes: int) -> int:
    """Bytes the widened form adds for unfused linear `name` (out_features rows) at slot rank `rank`: its rows of
    E, P*R columns each (0 for a linear that is not widened)."""
    from zimage.weights.lora.merge import FUSED  # leaf -> (fused name, part, parts): q/k/v and w1/w3

    leaf = name.rpartition(".")[2]
    if not (".attention." in name or ".feed_forward." in name) or (leaf not in FUSED and leaf != "w2"):
        return 0
    parts = FUSED[leaf][2] if leaf in FUSED else 1  # w2 is widened on its own
    return out_features * parts * rank * dtype_bytes
