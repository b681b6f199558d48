"""`PlannedPolicy`: applies a MemoryPlan to the engine's networks.

- transformer: the plan's streamed blocks live in pinned host memory and are streamed in every forward
  (zimage.memory.streamer); everything else is on the device.
- text encoder, when offloaded: its token embedding table stays on the host (a gather of <= 512 rows: the CPU does
  it in microseconds, and 0.7 GiB of GPU memory is saved), the plan's resident layers are on the device, the
  others are streamed in only when a prompt is not in the embedding cache (the streamer allocates its GPU buffers
  at the first streamed layer, so a cached prompt moves nothing); the buffers are given back before denoise.
- VAE: on the device; tiled decode in 512-pixel tiles when the plan says so.
"""

from __future__ import annotations

from zimage.memory.plan import MemoryPlan
from zimage.memory.policy import Parts

TILE_PX = 512


def home(plan: MemoryPlan, network: str, device):
    """Where `network` ('transformer' | 'text_encoder' | 'vae') is loaded under `plan`: the device, or 'cpu' for
    streamed or offloaded networks (`PlannedPolicy.place` moves their resident parts). A transformer stored in fp8 is
    loaded (bf16) and quantised on the host, so the GPU never holds the bf16 copy."""
    if network == "transformer" and (plan.transformer_streamed or plan.weight_dtype == "fp8"):
        return "cpu"
    if network == "text_encoder" and plan.text_offloaded:
        return "cpu"
    return device


class PlannedPolicy:
    def __init__(self, plan: MemoryPlan):
        self.plan = plan
        self.name = plan.kind
        self.parts = None
        self.tiled_decode = plan.tiled_decode
        self.transformer_streamer = None
        self.text_streamer = None
        self._embed_hooks = []

    def place(self, parts: Parts) -> None:
        from zimage.memory.streamer import BlockStreamer

        self.parts = parts
        device = parts.device
        tr, te = parts.transformer, parts.text_encoder
        streamed = self.plan.streamed_blocks()
        if streamed:
            self.transformer_streamer = BlockStreamer(tr.layers, streamed, device)
        _move_except(tr, [tr.layers[i] for i in streamed], device)
        if self.plan.text_offloaded:
            text_streamed = self.plan.streamed_text_layers()
            if text_streamed:
                self.text_streamer = BlockStreamer(te.layers, text_streamed, device)
            _move_except(te, [te.layers[i] for i in text_streamed] + [te.embed_tokens], device)
            _move_except(te.embed_tokens, [], "cpu")
            self._embed_hooks = _embed_on_host(te.embed_tokens, device)
        else:
            _move_except(te, [], device)
        for vae in (parts.vae, parts.vae_encoder):
            if vae is not None:
                vae.to(device)
                if self.plan.tiled_decode:  # the encoder tiles like the decoder (VAEEncoder.tiled_encode)
                    _set_tiles(vae, TILE_PX)
        _empty_cache(device)

    def enter(self, phase: str) -> None:
        if phase in ("encode_image", "denoise") and self.text_streamer is not None:
            self.text_streamer.release()
        if phase in ("decode", "encode", "encode_image") and self.transformer_streamer is not None:
            self.transformer_streamer.release()

    def remove(self) -> None:
        """Undo the hooks (streamed parts stay in host memory), before another policy places the networks."""
        for s in (self.transformer_streamer, self.text_streamer):
            if s is not None:
                s.remove()
        for h in self._embed_hooks:
            h.remove()
        self._embed_hooks = []
        self.transformer_streamer = self.text_streamer = None

    def bytes_moved(self) -> int:
        """Host -> device bytes streamed so far (transformer blocks + text layers)."""
        return sum(s.bytes_moved for s in (self.transformer_streamer, self.text_streamer) if s is not None)

    def describe(self) -> str:
        return self.plan.describe()


def _move_except(module, skip: list, device) -> None:
    """Move every parameter and buffer of `module` to `device`, except those inside the `skip` modules."""
    import torch

    skipped = {id(m) for s in skip for m in s.modules()}
    device = torch.device(device)
    for mod in module.modules():
        if id(mod) in skipped:
            continue
        for name, p in mod._parameters.items():
            if p is not None and p.device != device:
                p.data = p.data.to(device)
        for name, b in mod._buffers.items():
            if b is not None and b.device != device:
                mod._buffers[name] = b.to(device)


def _embed_on_host(embed, device) -> list:
    """Run the embedding lookup on the host: ids go to the CPU, the (B, L, D) embeddings come back to `device`."""
    import torch

    device = torch.device(device)

    def pre(module, args):
        return (args[0].to("cpu"),) + tuple(args[1:])

    def post(module, args, output):
        return output.to(device, non_blocking=True)

    return [embed.register_forward_pre_hook(pre), embed.register_forward_hook(post)]


def _set_tiles(vae, tile_px: int) -> None:
    """The VAE tiles at `config.sample_size` by default, as diffusers' AutoencoderKL (1024 for the Flux VAE: a
    1024x1024 image would be one full-size tile, saving nothing). Set 512-pixel tiles (64 latent pixels), 25%
    overlap as diffusers blends."""
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // 8  # the Flux VAE downsamples by 8


def _empty_cache(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
