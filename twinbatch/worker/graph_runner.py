"""CUDA graphs of model steps: all the graph code in one place.

A decode step of n tokens, microbatched (DBO) or not, runs as the graph of the smallest batch bucket >= n, with
the batch padded by one-token requests that read and write only the reserved block 0. Decode graphs are keyed by
(batch bucket, context bucket, microbatched) -- the context bucket bounds the batched attention's gather.

A prefill or mixed step runs as a graph when its requests' contexts (new tokens included) fit the token budget:
its tokens and its context both bounded by one token bucket, it takes the packed attention layout (one gather of
every context into a buffer of that many rows, variable-length flash attention; layers/attention.py), which
reads nothing on the host. Its request rows are padded with empty requests to a power of 4. Prefill graphs are
keyed by (token bucket, request rows, microbatched). Graphs are captured on first use.

Every DP rank makes the same decision from the same synced numbers, so all capture (and replay)
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
from twinbatch.worker.inputs import GraphStep, StepInputs


def _power_of_two_buckets(limit: int, start: int = 1) -> list[int]:
    buckets, b = [], start
    while b < limit:
        buckets.append(b)
        b *= 2
    return [*buckets, limit]


class GraphRunner:
    def __init__(self, runner: torch.nn.Module, max_tokens: int, max_model_len: int, max_prefill_tokens: int) -> None:
        self.runner = runner  # ModelRunner: model, persistent input buffers and (with DBO) the microbatched forward
        self.batch_buckets = _power_of_two_buckets(max_tokens)
        self.context_buckets = _power_of_two_buckets(max_model_len, start=256)
        self.prefill_buckets = _prefill_buckets(max_prefill_tokens)
        # ("decode", batch bucket, context bucket, microbatched) or ("prefill", tokens, request rows, microbatched)
        self.graphs: dict[tuple[str, int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        # one stream for every warm-up run: cuBLAS keeps a workspace per (handle, stream), never freed
        self.warmup_stream = torch.cuda.Stream()

    def batch_bucket(self, num_tokens: int) -> int | None:
        return next((b for b in self.batch_buckets if b >= num_tokens), None)

    def prefill_bucket(self, context_tokens: int) -> int | None:
        """The token bucket of a prefill graph whose requests' contexts (new tokens included) sum to
        context_tokens; None past the token budget: such steps run eagerly."""
        return next((b for b in self.prefill_buckets if b >= context_tokens), None)

    def run(self, batch_bucket: int, max_seq_len: int, microbatch: bool = False) -> torch.Tensor:
        """Replays (capturing first if needed) on the inputs already in the runner's buffers -> hidden [b, H].
        With `microbatch` the graph holds the whole DBO step: its microbatches' kernels and collectives, ordered
        as the microbatch threads issued them during capture; replay needs no thread."""
        context = next(c for c in self.context_buckets if c >= max_seq_len)
        return self._replay(("decode", batch_bucket, context, microbatch))

    def run_prefill(self, tokens: int, rows: int, microbatch: bool = False) -> torch.Tensor:
        """The same for a prefill or mixed step in the packed layout: `tokens` (the bucket, also the context
        bound) and `rows` request rows in the buffers."""
        return self._replay(("prefill", tokens, rows, microbatch))

    def clear(self) -> None:
        """Drops every graph and its memory (they are captured again on next use)."""
        self.graphs.clear()
        self.pool = None

    def _replay(self, key: tuple[str, int, int, bool]) -> torch.Tensor:
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden

    def _capture(self, kind: str, b: int, n: int, microbatch: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A decode graph (n: the context bucket) or a prefill graph (n: request rows) of b tokens."""
        buf, model = self.runner.buffers, self.runner.model
        rows = b if kind == "decode" else n
        meta = AttentionMetadata(
            buf.query_start_loc[: rows + 1], buf.seq_lens[:rows], buf.block_tables[:rows], buf.slot_mapping[:b],
            self.runner.block_size, decode_only=kind == "decode", max_seq_len=n if kind == "decode" else b,
            context_bound=0 if kind == "decode" else b,
        )  # fmt: skip
        if microbatch:  # decode: one token per request, so the request offsets are known without reading the device
            inputs = StepInputs(buf.input_ids[:b], buf.positions[:b], meta, buf.logits_indices[:0])
            starts = list(range(b + 1)) if kind == "decode" else None
            forward = functools.partial(self.runner.ubatched, inputs, starts)
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


def graph_step(graphs: GraphRunner | None, decode_only: bool, tokens: int, context_tokens: int) -> GraphStep | None:
    """How a step runs as a CUDA graph: a decode graph when it has only decodes (or nothing) and `tokens` fits a
    batch bucket; else a prefill graph when its tokens and its requests' contexts (new tokens included) fit the
    token budget; else None (eager), as always where there are no graphs. Under DP every rank passes the same
    synced numbers (the largest of each), so all take the same graph."""
    if graphs is None:
        return None
    if decode_only and (bucket := graphs.batch_bucket(tokens)) is not None:
        return GraphStep(bucket)
    bucket = graphs.prefill_bucket(max(tokens, context_tokens))
    return GraphStep(bucket, prefill=True) if bucket is not None else None


def _prefill_buckets(limit: int) -> list[int]:
    """Powers of two up to 512 tokens, then steps of 512: a step pads by less than 512 tokens past that."""
    small = _power_of_two_buckets(min(limit, 512), start=16)
    return [*small, *range(1024, limit, 512), limit] if limit > 512 else small
