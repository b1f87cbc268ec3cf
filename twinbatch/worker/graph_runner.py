"""CUDA graphs of model steps: all the graph code in one place.

A decode step of n tokens, microbatched (DBO) or not, runs as the graph of the smallest batch bucket >= n, with
the batch padded by one-token requests that read and write only the reserved block 0. Decode graphs are keyed by
(batch bucket, context bucket, overlap mode) -- the context bucket bounds the batched attention's gather.

A prefill or mixed step runs as a graph when its requests' contexts (new tokens included) fit the token budget:
its tokens and its context both bounded by one token bucket, it takes the packed attention layout (one gather of
every context into a buffer of that many rows, variable-length flash attention; layers/attention.py), which
reads nothing on the host. Its request rows are padded with empty requests to a power of 4. Prefill graphs are
keyed by (token bucket, request rows, overlap mode).

The engine captures every graph its steps can replay at start-up (ModelRunner.capture_graphs) and then closes
the set: a step whose graph is not in it runs eagerly instead of stalling every running request for a capture.
Used directly (bench step, tests), a runner captures a graph on its first use.

Every DP rank makes the same decision from the same synced numbers, so all capture (and replay)
together, and the all-to-all collectives inside the graphs line up.

A DBO graph is captured with the microbatch threads running: they take turns issuing kernels on the capturing
stream, and their collectives go to NCCL's stream, joined by events. The graph keeps that order as dependencies,
so on replay microbatch 1's compute runs while microbatch 0's all-to-all is in flight, with no thread at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from twinbatch.core.step_plan import GraphBuckets, StepPlan
from twinbatch.layers.attention import AttentionMetadata
from twinbatch.worker.inputs import InputBuffers, StepInputs

Forward = Callable[[StepInputs, StepPlan], torch.Tensor]  # the eager forward of a planned step -> hidden states


class GraphRunner:
    def __init__(self, buffers: InputBuffers, block_size: int, buckets: GraphBuckets, forward: Forward) -> None:
        self.buffers, self.block_size, self.buckets, self.forward = buffers, block_size, buckets, forward
        # ("decode", batch bucket, context bucket, mode) or ("prefill", tokens, request rows, mode); mode: plan.label
        self.graphs: dict[tuple[str, int, int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.closed = False  # True: no more captures; a step without a graph runs eagerly
        # one stream for every warm-up run: cuBLAS keeps a workspace per (handle, stream), never freed
        self.warmup_stream = torch.cuda.Stream()

    def replay(self, plan: StepPlan, attn: AttentionMetadata) -> torch.Tensor | None:
        """Replays plan.graph (capturing it first if needed and not closed) on the inputs already in the buffers
        -> hidden [tokens, H]; None where the graph is not captured and the set is closed. A microbatched graph
        holds the whole step: its microbatches' kernels and collectives, ordered as the microbatch threads issued
        them during capture; replay needs no thread. attn: the step's metadata, for the decode graph's context
        bucket and the prefill graph's request rows."""
        graph, mode = plan.graph, plan.label
        if graph.prefill:
            key = ("prefill", graph.tokens, attn.num_reqs, mode)
        else:
            key = ("decode", graph.tokens, self.buckets.context_bucket(attn.max_seq_len), mode)
        if key not in self.graphs:
            if self.closed:
                return None
            self.graphs[key] = self._capture(key, plan)
        cuda_graph, hidden = self.graphs[key]
        cuda_graph.replay()
        return hidden

    def clear(self) -> None:
        """Drops every graph and its memory; they are captured again on next use."""
        self.graphs.clear()
        self.pool = None
        self.closed = False

    def _capture(self, key: tuple[str, int, int, str], plan: StepPlan) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A decode graph (n: the context bucket) or a prefill graph (n: request rows) of b tokens, holding the
        plan's forward: its mode, microbatch bounds and all-to-all sizes are those of every step with this key."""
        (kind, b, n, _), buf = key, self.buffers
        rows = b if kind == "decode" else n
        meta = AttentionMetadata(
            buf.query_start_loc[: rows + 1], buf.seq_lens[:rows], buf.block_tables[:rows], buf.slot_mapping[:b],
            self.block_size, decode_only=kind == "decode", max_seq_len=n if kind == "decode" else b,
            context_bound=0 if kind == "decode" else b,
        )  # fmt: skip
        # decode: one token per request, so the request offsets are known without reading the device
        starts = list(range(b + 1)) if kind == "decode" else None
        inputs = StepInputs(buf.input_ids[:b], buf.positions[:b], meta, buf.logits_indices[:0], starts)
        side = self.warmup_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one eager run first (lazy initialisation must not happen in capture)
            self.forward(inputs, plan)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the microbatch threads issue the work on the capturing stream while this thread waits
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            hidden = self.forward(inputs, plan)
        self.pool = graph.pool()
        return graph, hidden
