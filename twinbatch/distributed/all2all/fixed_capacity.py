"""`all2all`: fixed-capacity exchange, the "low-latency" style.

Each rank sends every other rank a buffer of max_tokens rows (one per token of the busiest rank), filled with
the tokens that have at least one expert there; unused rows carry no expert. Slot positions are computed on the
device (cumulative sums), so nothing waits for the host and the step can be captured in a CUDA graph.
Per-expert counts travel alongside for kernels that work on a masked per-expert layout.
"""

from __future__ import annotations

import torch

from twinbatch.distributed.all2all.base import All2AllBackend, ExpertInput, Handle, count_ids, sum_rows
from twinbatch.distributed.collectives import COLLECTIVES


class FixedCapacityAll2All(All2AllBackend):
    def dispatch_launch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, max_tokens: int
    ) -> Handle:
        target, *sends = self._pack(x, topk_weights, topk_ids, max_tokens)
        handle = Handle(num_tokens=x.shape[0], state={"target": target})
        for name, t in zip(("x", "meta", "counts"), sends, strict=True):
            out = torch.empty_like(t)
            COLLECTIVES.all_to_all(out, t, handle.works, group=self.group)
            handle.state[name] = out
        return handle

    def _pack(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, cap: int
    ) -> tuple[torch.Tensor, ...]:
        """-> (target, send_x, send_meta, counts): the send buffers, [size * cap, ...] each, and where each
        (token, destination) pair went. Compute only, apart from the collectives' loop (under torch.compile a
        loop that calls a collective runs eagerly; this function still compiles as a graph of its own)."""
        n, hidden, size = x.shape[0], x.shape[1], self.size
        owner, mask = self.destinations(topk_ids)  # mask [n, size]
        ranks = torch.arange(size, device=x.device)
        # [n, size] row of each (token, destination) pair in the send buffer; pairs not sent go to a spare row
        target = torch.where(mask, ranks * cap + mask.cumsum(0) - 1, size * cap).flatten()
        send_x = x.new_zeros(size * cap + 1, hidden)
        send_x[target] = x[:, None, :].expand(n, size, hidden).reshape(-1, hidden)
        k = topk_ids.shape[1]
        send_meta = torch.cat([x.new_full((size * cap + 1, k), self.num_experts, dtype=torch.float32),
                               x.new_zeros(size * cap + 1, k, dtype=torch.float32)], dim=1)  # fmt: skip
        pairs = self.routing_for(owner.repeat_interleave(size, 0), topk_ids.repeat_interleave(size, 0),
                                 topk_weights.repeat_interleave(size, 0), ranks.repeat(n))  # fmt: skip
        send_meta[target] = pairs
        counts = count_ids(topk_ids.flatten(), self.num_experts)
        return target, send_x[:-1].contiguous(), send_meta[:-1].contiguous(), counts

    def dispatch_wait(self, handle: Handle) -> ExpertInput:
        handle.wait()
        s = handle.state
        weights, local_ids = self.split_routing(s["meta"])
        counts = s["counts"].view(self.size, self.num_local_experts).sum(0)
        return ExpertInput(s["x"], weights, local_ids, counts)

    def combine_launch(self, expert_out: torch.Tensor, handle: Handle) -> None:
        back = torch.empty_like(expert_out)
        COLLECTIVES.all_to_all(back, expert_out, handle.works, group=self.group)
        handle.state["back"] = back

    def combine_wait(self, handle: Handle) -> torch.Tensor:
        handle.wait()
        back = handle.state["back"]
        rows = torch.cat([back, back.new_zeros(1, back.shape[1])])[handle.state["target"]]
        return sum_rows(rows.view(handle.num_tokens, self.size, back.shape[1]))
