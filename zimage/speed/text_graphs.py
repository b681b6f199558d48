"""The text encoder replayed from CUDA graphs (compile mode): a new prompt's encoding without its launch overhead.

At ~30 tokens the 35 Qwen3 layers are ~2000 small kernels whose eager launches take far longer than their GPU
work. Measured on an H200 (full-size encoder, random bf16 weights, 30 tokens): eager 28-34 ms, graphed 7.3 ms, which
is the kernels' own time (6.5 ms: the matrix products ~2.6 ms, the rest norms, rope and casts); two prompts
(prompt + negative) 33-43 ms -> 7.5 ms.

A graph has fixed shapes, so token ids are right-padded to a length bucket (32, 64, ... up to the tokenizer's limit)
and the graph runs with no attention mask (SDPA's is_causal). That is exact for the real tokens: the encoder is
causal and the padding is on the right (zimage.models.tokenizer pads right), so no real token sees a padded one; the
rows past a prompt's length are garbage, and PromptEncoder keeps only h[:n]. tests/test_text_graphs.py checks it on
CPU; on the H200 the graph's real rows equal the eager padded call's bitwise, and a lone prompt's equal the unpadded
encoder's bitwise (in a batch of several prompts, real rows differ from each prompt encoded alone by bf16 rounding,
as much as the masked eager call's do: other matrix shapes). Padding costs little: graphed, 32 tokens take 7.3 ms
and 128 take 8.0 ms.

Graphs are captured lazily, once per (batch, bucket), as the PyTorch docs describe (warm-up on a side stream, then
capture), at most MAX_GRAPHS of them, all in one shared memory pool. A batch x bucket above MAX_GRAPH_TOKENS, a
length above the largest bucket, or a full graph table runs eager, unpadded, as without this module.
Only when the whole encoder stays on the device (`use_text_graphs`): under a text-offload plan its embedding runs on
the host and streamed layers swap their weights in hooks, which a graph would freeze. A graph holds the addresses
of the weights as they were at capture: every placement (Engine.place, also after an out-of-memory fallback) asks
for a fresh wrapper (`graphed_text_encoder`), and the old graphs and their pool are dropped with the old one.
This module imports torch: it is imported only when an engine is being set up.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from zimage.memory.policy import on_device

log = logging.getLogger("zimage")

SMALLEST_BUCKET = 32  # tokens; a chat-templated prompt is rarely shorter than ~20
MAX_GRAPHS = 16  # (batch, bucket) pairs kept; more shapes than that run eager
# Batch x bucket above this runs eager: the shared pool keeps the activations of the largest graph for the life of
# the engine (into denoise), and a batch that large has enough GPU work to hide most of its launches (H200: 4 x 512
# tokens, eager 44 ms, graphed 40 ms). At this cap (a prompt and its negative at 512 tokens each: eager 49 ms, graphed
# 22 ms) the pool reserves ~0.1 GiB (H200; a 4 x 512 graph made it ~0.22 GiB).
MAX_GRAPH_TOKENS = 1024
WARMUP_RUNS = 3  # as the PyTorch docs' example; also fills the encoder's per-device rope cache before capture
PAD_ID = 0  # any valid id: padded rows are never read


def length_buckets(max_tokens: int, smallest: int = SMALLEST_BUCKET) -> tuple[int, ...]:
    """Powers of two from `smallest` below `max_tokens`, then `max_tokens` itself: (32, 64, 128, 256, 512) for 512."""
    out = []
    b = smallest
    while b < max_tokens:
        out.append(b)
        b *= 2
    out.append(max_tokens)
    return tuple(out)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket that holds `length` tokens, or None (longer than the largest: run eager)."""
    for b in buckets:
        if length <= b:
            return b
    return None


def fill_padded(buffer: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """buffer (B, bucket) <- input_ids (B, L), L <= bucket, right-padded with PAD_ID. The graph's input and the eager
    padded path are both made by this function, so the CPU test of the latter covers the former's padding."""
    n = input_ids.shape[1]
    buffer[:, :n].copy_(input_ids)
    buffer[:, n:].fill_(PAD_ID)  # stale ids of a longer earlier prompt would do too; this keeps replays identical
    return buffer


def use_text_graphs(device, plan, text_encoder) -> bool:
    """Whether the text encoder can be captured: CUDA, not offloaded by the plan, no hooks, every weight on `device`.

    The parameter check alone would catch offloaded and streamed parts (they live on the host between uses); the plan
    and hook checks say why, and hold even if a policy someday parks host weights differently.
    """
    if getattr(device, "type", None) != "cuda":
        return False
    if plan is not None and getattr(plan, "text_offloaded", False):
        return False  # embedding on the host + streamed layers: weights change address per call
    if any(m._forward_hooks or m._forward_pre_hooks for m in text_encoder.modules()):
        return False  # a hook (a streamer's weight swap, say) would be frozen into the graph
    return on_device(text_encoder, device)


@dataclass
class _Graph:
    ids: torch.Tensor  # (B, bucket) long, static input: copied into before each replay
    out: torch.Tensor  # (B, bucket, D), static output: overwritten by each replay
    graph: object  # torch.cuda.CUDAGraph


class GraphedTextEncoder:
    """Drop-in for a Qwen3TextEncoder in PromptEncoder: (input_ids (B, L) long, attention_mask (B, L) or None) ->
    (B, L, D). The result of a replay is a view of the graph's static output, valid until the next call: the caller
    copies what it keeps (PromptEncoder clones each prompt's rows at once), which saves a (B, L, D) copy here.

    capture=False pads and runs eager, never capturing: the graphs' exact computation without CUDA (tests).
    """

    def __init__(self, encoder, device, max_tokens: int = 512, max_graphs: int = MAX_GRAPHS,
                 max_graph_tokens: int = MAX_GRAPH_TOKENS, capture: bool = True):
        self.encoder = encoder  # the plain Qwen3TextEncoder (also engine.text_encoder)
        self.device = torch.device(device)
        self.buckets = length_buckets(max_tokens)
        self.max_graphs = max_graphs
        self.max_graph_tokens = max_graph_tokens
        self.capture = capture
        self.graphs: dict[tuple[int, int], _Graph] = {}  # (B, bucket) -> captured graph
        self._pool = None  # one memory pool shared by every graph (replays never overlap: one stream, one caller)
        self._failed = False  # a capture failed (not for memory): stay eager rather than retry each call

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n = input_ids.shape
        bucket = bucket_for(n, self.buckets)
        with torch.inference_mode():  # static buffers are inference tensors: written in inference mode only
            if bucket is None or b * bucket > self.max_graph_tokens:
                return self.encoder(input_ids, attention_mask)  # eager, unpadded: as without graphs
            if not self.capture:
                ids = fill_padded(input_ids.new_empty(b, bucket), input_ids)
                return self.encoder(ids, None)[:, :n]  # what the graph computes; real rows exact (causal)
            g = self._graph(b, bucket)
            if g is None:
                return self.encoder(input_ids, attention_mask)
            with torch.cuda.device(self.device):  # the graph's device: copy in and replay on its current stream
                fill_padded(g.ids, input_ids)
                g.graph.replay()
            return g.out[:, :n]  # (B, L, D) view of the static output; the next replay overwrites it

    def _graph(self, b: int, bucket: int) -> _Graph | None:
        g = self.graphs.get((b, bucket))
        if g is None and not self._failed and len(self.graphs) < self.max_graphs:
            try:
                g = self.graphs[(b, bucket)] = self._capture(b, bucket)
            except torch.OutOfMemoryError:
                raise  # zimage.memory.oom re-plans, and re-installs this wrapper fresh
            except Exception as e:  # noqa: BLE001 - a graph is an optimisation: never fail a generation for it
                self._failed = True
                log.warning("CUDA graph capture of the text encoder failed (%s: %s); it runs eager",
                            type(e).__name__, e)
                return None
            log.info("text encoder captured for batch %d x %d tokens (%d graphs)", b, bucket, len(self.graphs))
        return g

    def _capture(self, b: int, bucket: int) -> _Graph:
        """The PyTorch docs' pattern (notes/cuda.html#cuda-graphs): warm up on a side stream, then capture."""
        with torch.cuda.device(self.device):
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            ids = torch.full((b, bucket), PAD_ID, dtype=torch.long, device=self.device)  # static input (B, bucket)
            side = _side_stream(self.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self.encoder(ids, None)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # Captured on that same side stream (not torch.cuda.graph's own): one stream less with a cuBLAS
            # workspace. thread_local: only this thread's calls matter to the capture (the server's HTTP thread
            # reads memory statistics meanwhile).
            with torch.cuda.graph(graph, pool=self._pool, stream=side, capture_error_mode="thread_local"):
                out = self.encoder(ids, None)  # static output (B, bucket, D), kept alive in the pool
        return _Graph(ids, out, graph)


# device -> the one stream every capture warms up and captures on. cuBLAS keeps a workspace (~32 MiB on Hopper) for
# each stream it has run on, for the life of the process: with a new stream per capture, allocated memory grew by
# ~33 MiB a graph (measured on an H200); with this one stream, by the graph's static output (after ~64 MiB once).
_SIDE_STREAMS: dict = {}


def _side_stream(device):
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


def graphed_text_encoder(text_encoder, device, plan, max_tokens: int) -> GraphedTextEncoder | None:
    """A fresh GraphedTextEncoder around `text_encoder` when its placement allows graphs (`use_text_graphs`), else
    None. Fresh each time: graphs hold the weights' addresses at capture, so every placement gets its own."""
    if not use_text_graphs(device, plan, text_encoder):
        return None
    return GraphedTextEncoder(text_encoder, device, max_tokens)
