"""CUDA graphs of decode steps: all the graph code in one place.

A decode step of n tokens, microbatched (DBO) or not, runs as the graph of the smallest batch bucket >= n, with
the batch padded by one-token requests that read and write only the reserved block 0. Graphs are keyed by (batch
bucket, context bucket, microbatched) -- the context bucket bounds the batched attention's gather -- and captured
on first use. Every DP rank makes the same decision from the same synced numbers, so all capture (and replay)
together, and the all-to-all collectives inside the graphs line up.

A DBO graph is captured with the microbatch threads running: they take turns issuing kernels on the capturing
stream, and their collectives go to NCCL's stream, joined by events. The graph keeps that order as dependencies,
so on replay microbatch 1's compute runs while microbatch 0's all-to-all is in flight, with no thread at all.
"""

from __future__ import annotations

import functools

import torch

from twinbatch.forward_context import ForwardContext
from twinbatch.layers.attention import AttentionMetadata
from twinbatch.worker.model_runner import StepInputs


def _power_of_two_buckets(limit: int, start: int = 1) -> list[int]:
    buckets, b = [], start
    while b < limit:
        buckets.append(b)
        b *= 2
    return [*buckets, limit]


class GraphRunner:
    def __init__(self, runner: torch.nn.Module, max_tokens: int, max_model_len: int) -> None:
        self.runner = runner  # ModelRunner: model, persistent input buffers and (with DBO) the microbatched forward
        self.batch_buckets = _power_of_two_buckets(max_tokens)
        self.context_buckets = _power_of_two_buckets(max_model_len, start=256)
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        # one stream for every warm-up run: cuBLAS keeps a workspace per (handle, stream), never freed
        self.warmup_stream = torch.cuda.Stream()

    def batch_bucket(self, num_tokens: int) -> int | None:
        return next((b for b in self.batch_buckets if b >= num_tokens), None)

    def run(self, batch_bucket: int, max_seq_len: int, microbatch: bool = False) -> torch.Tensor:
        """Replays (capturing first if needed) on the inputs already in the runner's buffers -> hidden [b, H].
        With `microbatch` the graph holds the whole DBO step: its microbatches' kernels and collectives, ordered
        as the microbatch threads issued them during capture; replay needs no thread."""
        key = (batch_bucket, next(c for c in self.context_buckets if c >= max_seq_len), microbatch)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden

    def clear(self) -> None:
        """Drops every graph and its memory (they are captured again on next use)."""
        self.graphs.clear()
        self.pool = None

    def _capture(self, b: int, context: int, microbatch: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        buf, model = self.runner.buffers, self.runner.model
        meta = AttentionMetadata(
            buf.query_start_loc[: b + 1], buf.seq_lens[:b], buf.block_tables[:b], buf.slot_mapping[:b],
            self.runner.block_size, decode_only=True, max_seq_len=context,
        )  # fmt: skip
        if microbatch:  # one token per request, so the request offsets are known without reading the device
            inputs = StepInputs(buf.input_ids[:b], buf.positions[:b], meta, buf.logits_indices[:0])
            forward = functools.partial(self.runner.ubatched, inputs, list(range(b + 1)))
        else:
            forward = functools.partial(model, buf.input_ids[:b], buf.positions[:b], ForwardContext(meta, b))
        side = self.warmup_stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one eager run first (lazy initialisation must not happen in capture)
            forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the microbatch threads issue the work on the capturing stream while this thread waits
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            hidden = forward()
        self.pool = graph.pool()
        return graph, hidden
