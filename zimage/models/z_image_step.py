"""The forward of Z-Image's transformer, split so that per-request work runs once: the same function as diffusers'
ZImageTransformer2DModel.forward (basic mode), built from the modules of zimage.models.z_image.

    ctx = prepare(model, captions, h, w)   # once per request (ZImageTransformer.prepare)
    v = forward(model, x, t, ctx)          # once per step (ZImageTransformer.forward, i.e. model(x, t, ctx))

What is moved out of the step loop (all of it depends on captions and image size only, not on x or t):
- caption embedding and the 2 context-refiner blocks (they have no timestep modulation);
- padding, pad tokens, position ids and RoPE tables (as real cos/sin, see zimage.models.z_image.apply_rope);
- attention masks (None when every sequence of the batch has the same length, the usual case).
Per step remain: timestep embedding, patchify + x embedding, 2 noise-refiner blocks, 30 joint blocks, final layer,
unpatchify. Shapes: B images, C=16 latent channels, latent h x w, p=2 patch, N = (h/2)(w/2) image tokens padded
to a multiple of 32 (Nx), caption lengths L_i padded to multiples of 32 (Lc_i), D = 3840 model width.
"""

from __future__ import annotations

from dataclasses import dataclass

SEQ_MULTI_OF = 32  # Z-Image pads every sequence to a multiple of this


def _pad_len(n: int) -> int:
    return (-n) % SEQ_MULTI_OF


@dataclass
class StepContext:
    """Per-request tensors shared by every step."""

    cap: object  # (B, Lc_max, D) refined caption features (rows past Lc_i are padding)
    cap_lens: list[int]  # Lc_i
    x_freqs: object  # (B, Nx, head_dim/2, 2) real RoPE table of the image tokens (cos, sin)
    unified_freqs: object  # (B, Nx + Lc_max, head_dim/2, 2)
    unified_mask: object  # (B, Nx + Lc_max) bool, or None when all Lc_i are equal
    grid: tuple[int, int]  # (h/2, w/2) image tokens per side
    n_tokens: int  # N = product of grid, before padding


# ---------------------------------------------------------------- once per request
def prepare(m, captions: list, height: int, width: int) -> StepContext:
    """m: a ZImageTransformer; captions: B tensors (L_i, cap_dim); height/width: latent size (h, w)."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    device = captions[0].device
    gh, gw = height // m.patch, width // m.patch
    n = gh * gw
    nx = n + _pad_len(n)
    cap_feats, cap_freqs, cap_pad, x_freqs, lens = [], [], [], [], []
    for cap in captions:
        length = len(cap)
        lc = length + _pad_len(length)
        # caption rows past L_i repeat the last row (then become the pad token); positions 1..Lc
        cap_feats.append(torch.cat([cap, cap[-1:].repeat(lc - length, 1)]) if lc > length else cap)
        cap_pad.append(torch.arange(lc, device=device) >= length)
        cap_freqs.append(m.rope(m.coordinate_grid((lc, 1, 1), (1, 0, 0), device)))
        # image tokens start after the caption positions; padding tokens sit at position (0, 0, 0)
        ids = m.coordinate_grid((1, gh, gw), (lc + 1, 0, 0), device)
        if nx > n:
            ids = torch.cat([ids, torch.zeros(nx - n, 3, dtype=ids.dtype, device=device)])
        x_freqs.append(m.rope(ids))
        lens.append(lc)
    # caption embed + refine, once (no timestep input in these blocks). Embedded as one (B, Lc_max, cap_dim) batch, a
    # row per image (per-row LoRA slots see one row per image); rows past Lc_i are zeros, as pad_sequence leaves them.
    feats = m.cap_embedder(pad_sequence(cap_feats, batch_first=True))  # (B, Lc_max, D)
    pad = pad_sequence(cap_pad, batch_first=True, padding_value=True).unsqueeze(-1)  # (B, Lc_max, 1)
    real = pad_sequence([torch.ones(lc, dtype=torch.bool, device=device) for lc in lens], batch_first=True)
    cap = torch.where(pad, m.cap_pad_token.to(feats.dtype), feats) * real.unsqueeze(-1)  # (B, Lc_max, D)
    freqs_c = pad_sequence(cap_freqs, batch_first=True)
    uniform = len(set(lens)) == 1
    cap_mask = None if uniform else torch.stack(
        [torch.arange(max(lens), device=device) < lc for lc in lens])
    for block in m.context_refiner:
        cap = block(cap, cap_mask, freqs_c)
    x_freqs_t = pad_sequence(x_freqs, batch_first=True)  # (B, Nx, ., 2)
    unified = pad_sequence([torch.cat([xf, cf[:lc]]) for xf, cf, lc in zip(x_freqs, cap_freqs, lens)],
                           batch_first=True)
    unified_mask = None if uniform else torch.stack(
        [torch.arange(nx + max(lens), device=device) < nx + lc for lc in lens])
    return StepContext(cap, lens, x_freqs_t, unified, unified_mask, (gh, gw), n)


# ---------------------------------------------------------------- once per step
def forward(m, x, t, ctx: StepContext):
    """x (B, C, h, w) in the model dtype, t (B,) in [0, 1] -> velocity (B, C, h, w) in the model dtype."""
    import torch

    p = m.patch
    B, C, h, w = x.shape
    gh, gw = ctx.grid
    adaln = m.t_embedder(t * m.t_scale).type_as(x)  # (B, 256)
    # patchify: (B, C, gh, p, gw, p) -> (B, gh*gw, p*p*C), token order h-major as the reference
    tokens = x.view(B, C, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, p * p * C)
    tokens = m.all_x_embedder["2-1"](tokens)  # (B, N, D)
    nx = ctx.x_freqs.shape[1]
    if nx > ctx.n_tokens:  # pad rows repeat the last token, then become the pad token
        pad = m.x_pad_token.to(tokens.dtype).expand(B, nx - ctx.n_tokens, -1)
        tokens = torch.cat([tokens, pad], dim=1)
    for block in m.noise_refiner:
        tokens = block(tokens, None, ctx.x_freqs, adaln)
    if ctx.unified_mask is None:
        unified = torch.cat([tokens, ctx.cap], dim=1)  # (B, Nx + Lc, D)
    else:
        unified = tokens.new_zeros(B, ctx.unified_mask.shape[1], tokens.shape[-1])
        unified[:, :nx] = tokens
        for i, lc in enumerate(ctx.cap_lens):
            unified[i, nx:nx + lc] = ctx.cap[i, :lc]
    for block in m.layers:
        unified = block(unified, ctx.unified_mask, ctx.unified_freqs, adaln)
    out = m.all_final_layer["2-1"](unified[:, :ctx.n_tokens], c=adaln)  # (B, N, p*p*C)
    # unpatchify: (B, gh, gw, p, p, C) -> (B, C, h, w)
    return out.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h, w)
