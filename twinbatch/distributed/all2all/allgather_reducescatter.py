"""Baseline: every rank gathers every rank's tokens, applies its own experts, and a reduce-scatter sums the
partial results back onto the tokens' ranks. Simple, and traffic grows with the number of ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twinbatch.distributed.all2all.base import All2AllBackend, ExpertInput, Handle
from twinbatch.distributed.collectives import COLLECTIVES


class AllGatherReduceScatter(All2AllBackend):
    def dispatch_launch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, max_tokens: int
    ) -> Handle:
        n, pad = x.shape[0], max_tokens - x.shape[0]
        handle = Handle(num_tokens=n, state={"max_tokens": max_tokens})
        for name, t, fill in (("x", x, 0), ("w", topk_weights, 0), ("ids", topk_ids, self.num_experts)):
            t = F.pad(t, (0, 0, 0, pad), value=fill)  # every rank sends max_tokens rows
            out = t.new_empty(self.size * max_tokens, *t.shape[1:])
            COLLECTIVES.all_gather(out, t.contiguous(), handle.works, group=self.group)
            handle.state[name] = out
        return handle

    def dispatch_wait(self, handle: Handle) -> ExpertInput:
        handle.wait()
        s = handle.state
        return ExpertInput(s["x"], s["w"], self.to_local_ids(s["ids"]))

    def combine_launch(self, expert_out: torch.Tensor, handle: Handle) -> None:
        out = expert_out.new_empty(handle.state["max_tokens"], expert_out.shape[1])
        COLLECTIVES.reduce_scatter(out, expert_out, handle.works, group=self.group)
        handle.state["out"] = out

    def combine_wait(self, handle: Handle) -> torch.Tensor:
        handle.wait()
        return handle.state["out"][: handle.num_tokens]
