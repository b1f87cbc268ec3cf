"""Baseline: every rank gathers every rank's tokens, applies its own experts, and a reduce-scatter sums the
partial results back onto the tokens' ranks. Simple, and traffic grows with the number of ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twinbatch.distributed.all2all.base import All2AllBackend, ExpertInput, Handle
from twinbatch.distributed.collectives import COLLECTIVES


@dataclass
class GatherHandle(Handle):
    max_tokens: int
    x: torch.Tensor  # [size * max_tokens, hidden]: every rank's tokens, padded to max_tokens rows each
    weights: torch.Tensor  # [size * max_tokens, k]
    ids: torch.Tensor  # [size * max_tokens, k] global expert ids; padding rows choose none (num_experts)
    out: torch.Tensor | None = None  # [max_tokens, hidden] once combine is launched


class AllGatherReduceScatter(All2AllBackend):
    def dispatch_launch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, max_tokens: int
    ) -> GatherHandle:
        n, pad = x.shape[0], max_tokens - x.shape[0]
        sends = [F.pad(t, (0, 0, 0, pad), value=fill).contiguous()  # every rank sends max_tokens rows
                 for t, fill in ((x, 0), (topk_weights, 0), (topk_ids, self.num_experts))]  # fmt: skip
        gathered = [t.new_empty(self.size * max_tokens, *t.shape[1:]) for t in sends]
        handle = GatherHandle(n, [], max_tokens, *gathered)
        for out, t in zip(gathered, sends, strict=True):
            COLLECTIVES.all_gather(out, t, handle.works, group=self.group)
        return handle

    def dispatch_wait(self, handle: GatherHandle) -> ExpertInput:
        handle.wait()
        return ExpertInput(handle.x, handle.weights, self.to_local_ids(handle.ids))

    def combine_launch(self, expert_out: torch.Tensor, handle: GatherHandle) -> None:
        handle.out = expert_out.new_empty(handle.max_tokens, expert_out.shape[1])
        COLLECTIVES.reduce_scatter(handle.out, expert_out, handle.works, group=self.group)

    def combine_wait(self, handle: GatherHandle) -> torch.Tensor:
        handle.wait()
        return handle.out[: handle.num_tokens]
