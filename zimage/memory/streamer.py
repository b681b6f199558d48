"""Streaming some blocks of a ModuleList from pinned host memory into reusable GPU buffers, one step ahead.

Each streamed block's tensors are packed into one flat pinned host buffer (uint8, every tensor 256-byte aligned);
the GPU holds `STREAM_BUFFERS` flat buffers the size of the largest block. Before block k runs (forward pre-hook):
the compute stream waits for k's copy event, k's parameters are pointed at views of its GPU buffer, and the copy of
the next streamed block (cyclically: the first one of the next forward too) is issued on a side stream into the
other buffer, after that buffer's last reader has finished (an event recorded after its forward). After block k
(forward hook) its parameters are pointed back at the host views, so nothing but the streamer holds GPU buffers.
All waits are stream-to-event: the host never synchronises in the step loop.

On a CPU "device" the same code runs with plain memory, synchronously: what the CPU tests check (views, layout,
order) is what runs on the GPU, except the streams. Same idea as diffusers' group offloading (pinned memory,
a side stream, prefetch of the next group), but only for the blocks that do not fit, into fixed buffers
(no allocation per block, no `record_stream`), and the resident blocks' compute hides the copies.
"""

from __future__ import annotations

import logging

log = logging.getLogger("zimage")

ALIGN = 256  # bytes: every tensor view starts on a 256-byte boundary (any dtype view is legal, copies coalesce)
STREAM_BUFFERS = 2


def _tensors(block):
    """(owner module, attribute name, tensor) for every parameter and persistent buffer of `block`."""
    out = []
    for mod in block.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                out.append((mod, name, p))
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out.append((mod, name, b))
    return out


class _Packed:
    """One streamed block: a flat host buffer and where each tensor lies in it."""

    def __init__(self, block, pin: bool):
        import torch

        entries, offset = [], 0
        for mod, name, t in _tensors(block):
            entries.append((mod, name, offset, t.numel() * t.element_size(), t.dtype, tuple(t.shape)))
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self.nbytes = offset
        self.host = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        for (mod, name, off, n, dtype, shape), (_, _, t) in zip(entries, _tensors(block)):
            self.host[off:off + n].copy_(t.detach().reshape(-1).view(torch.uint8))
        self.entries = entries
        self.point_to(self.host)  # the block's old storage (GPU or pageable) is dropped here

    def point_to(self, flat) -> None:
        """Make the block's tensors views of `flat` (its host buffer, or a device buffer holding a copy)."""
        for mod, name, off, n, dtype, shape in self.entries:
            view = flat[off:off + n].view(dtype).view(shape)
            if name in mod._parameters:
                mod._parameters[name].data = view
            else:
                mod._buffers[name] = view


class BlockStreamer:
    """Streams `blocks[i] for i in streamed` of a ModuleList; the others must already be on `device`."""

    def __init__(self, blocks, streamed: list[int], device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.order = sorted(streamed)
        self.packed = {i: _Packed(blocks[i], pin=self.cuda) for i in self.order}
        self.buffer_bytes = max((p.nbytes for p in self.packed.values()), default=0)
        self.buffers: list = []  # allocated at first use, dropped by release()
        self.slot_of: dict[int, int] = {}  # streamed block -> buffer index, in cyclic order
        for k, i in enumerate(self.order):
            self.slot_of[i] = k % STREAM_BUFFERS
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready: dict[int, object] = {}  # streamed block -> event: its copy has landed
        self.free: list = [None] * STREAM_BUFFERS  # buffer -> event: its last reader has finished
        self.issued: set[int] = set()
        self.bytes_moved = 0  # host -> device bytes copied so far (for bandwidth reports)
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._make_pre(i)))
            if i in self.packed:
                self.handles.append(block.register_forward_hook(self._make_post(i)))

    # --------------------------------------------------------------- buffers
    def _ensure_buffers(self) -> None:
        import torch

        if not self.buffers and self.order:
            n = min(STREAM_BUFFERS, len(self.order))
            self.buffers = [torch.empty(self.buffer_bytes, dtype=torch.uint8, device=self.device) for _ in range(n)]
            if self.cuda:
                # The buffers come from the compute stream's pool, maybe from blocks whose last kernels are still
                # queued there; the copy stream, which writes them, must start after those.
                self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def release(self) -> None:
        """Give the GPU buffers back (between phases); the next forward allocates them again."""
        if self.cuda and self.buffers:
            import torch

            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)  # no copy still writing into them
        for packed in self.packed.values():  # after an error mid-forward a block may still point at a buffer
            packed.point_to(packed.host)
        self.buffers = []
        self.issued.clear()
        self.ready.clear()
        self.free = [None] * STREAM_BUFFERS

    def remove(self) -> None:
        """Unhook and leave every streamed block in (pageable-or-pinned) host memory."""
        self.release()
        for h in self.handles:
            h.remove()
        self.handles = []

    # --------------------------------------------------------------- copies
    def _issue(self, i: int) -> None:
        """Start copying streamed block i into its buffer (no-op if already issued)."""
        if i in self.issued:
            return
        self._ensure_buffers()
        slot = self.slot_of[i] % len(self.buffers)
        packed, buf = self.packed[i], self.buffers[slot]
        if self.cuda:
            import torch

            with torch.cuda.stream(self.copy_stream):
                if self.free[slot] is not None:
                    self.copy_stream.wait_event(self.free[slot])  # its previous block has finished reading it
                buf[:packed.nbytes].copy_(packed.host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.ready[i] = event
        else:
            buf[:packed.nbytes].copy_(packed.host)
        self.issued.add(i)
        self.bytes_moved += packed.nbytes

    def _next_streamed(self, i: int) -> int:
        """The first streamed block after block i, cyclically (so a forward's end prefetches the next's start)."""
        for j in self.order:
            if j > i:
                return j
        return self.order[0]

    def _make_pre(self, i: int):
        def pre(module, args):
            if not self.order:
                return None
            if i in self.packed:
                self._issue(i)  # normally issued one block earlier; here only on the very first use
                if self.cuda:
                    import torch

                    torch.cuda.current_stream(self.device).wait_event(self.ready.pop(i))
                self.packed[i].point_to(self.buffers[self.slot_of[i] % len(self.buffers)])
                self.issued.discard(i)
            nxt = self._next_streamed(i)
            if nxt != i and self.slot_of[nxt] % max(len(self.buffers), 1) != self._slot_in_use(i):
                self._issue(nxt)
            return None

        return pre

    def _slot_in_use(self, i: int):
        return self.slot_of[i] % len(self.buffers) if i in self.packed and self.buffers else None

    def _make_post(self, i: int):
        def post(module, args, output):
            slot = self.slot_of[i] % len(self.buffers)
            if self.cuda:
                import torch

                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(self.device))
                self.free[slot] = event
            self.packed[i].point_to(self.packed[i].host)
            return None

        return post
