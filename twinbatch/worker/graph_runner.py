"""CUDA graphs of decode steps: all the graph code in one place.

A decode step of n tokens runs as the graph of the smallest batch bucket >= n, with the batch padded by
one-token requests that read and write only the reserved block 0. Graphs are keyed by (batch bucket, context
bucket) -- the context bucket bounds the batched attention's gather -- and captured on first use. Every DP
rank makes the same decision from the same synced numbers, so all capture (and replay) together, and the
all-to-all collectives inside the graphs line up.
"""

from __future__ import annotations

import torch

from twinbatch.forward_context import ForwardContext
from twinbatch.layers.attention import AttentionMetadata


def _power_of_two_buckets(limit: int, start: int = 1) -> list[int]:
    buckets, b = [], start
    while b < limit:
        buckets.append(b)
        b *= 2
    return [*buckets, limit]


class GraphRunner:
    def __init__(self, runner: torch.nn.Module, max_tokens: int, max_model_len: int) -> None:
        self.runner = runner  # ModelRunner: model and persistent input buffers
        self.batch_buckets = _power_of_two_buckets(max_tokens)
        self.context_buckets = _power_of_two_buckets(max_model_len, start=256)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def batch_bucket(self, num_tokens: int) -> int | None:
        return next((b for b in self.batch_buckets if b >= num_tokens), None)

    def run(self, batch_bucket: int, max_seq_len: int) -> torch.Tensor:
        """Replays (capturing first if needed) on the inputs already in the runner's buffers -> hidden [b, H]."""
        key = (batch_bucket, next(c for c in self.context_buckets if c >= max_seq_len))
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden

    def _capture(self, b: int, context: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        buf, model = self.runner.buffers, self.runner.model
        meta = AttentionMetadata(
            buf.query_start_loc[: b + 1], buf.seq_lens[:b], buf.block_tables[:b], buf.slot_mapping[:b],
            self.runner.block_size, decode_only=True, max_seq_len=context,
        )  # fmt: skip
        ctx = ForwardContext(meta, b)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one eager run first (lazy initialisation must not happen in capture)
            model(buf.input_ids[:b], buf.positions[:b], ctx)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = model(buf.input_ids[:b], buf.positions[:b], ctx)
        self.pool = graph.pool()
        return graph, hidden
