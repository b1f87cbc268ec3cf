"""`all2allv`: variable split sizes, the "high-throughput" style.

Per-destination counts are exchanged first (the host reads them to size the buffers), then each rank sends
exactly the tokens that have an expert on the receiving rank: less traffic than fixed capacity for large
prefill batches, at the cost of one host synchronisation per dispatch.
"""

from __future__ import annotations

import torch

from twinbatch.distributed.all2all.base import All2AllBackend, ExpertInput, Handle
from twinbatch.distributed.collectives import COLLECTIVES


class All2Allv(All2AllBackend):
    def dispatch_launch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, max_tokens: int
    ) -> Handle:
        owner, mask = self.destinations(topk_ids)
        send_counts = mask.sum(dim=0)
        recv_counts = torch.empty_like(send_counts)
        counted: list = []
        COLLECTIVES.all_to_all(recv_counts, send_counts, counted, group=self.group)
        counted[0].wait()
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        dest, token = mask.t().nonzero(as_tuple=True)  # pairs ordered by destination, then token
        meta = self.routing_for(owner[token], topk_ids[token], topk_weights[token], dest)
        state = {"token": token, "dest": dest, "send": send_split, "recv": recv_split}
        handle = Handle(num_tokens=x.shape[0], state=state)
        for name, t in (("x", x[token]), ("meta", meta)):
            out = t.new_empty(sum(recv_split), t.shape[1])
            COLLECTIVES.all_to_all(out, t, handle.works, recv_split, send_split, group=self.group)
            handle.state[name] = out
        return handle

    def dispatch_wait(self, handle: Handle) -> ExpertInput:
        handle.wait()
        weights, local_ids = self.split_routing(handle.state["meta"])
        return ExpertInput(handle.state["x"], weights, local_ids)

    def combine_launch(self, expert_out: torch.Tensor, handle: Handle) -> None:
        s = handle.state
        back = expert_out.new_empty(sum(s["send"]), expert_out.shape[1])
        COLLECTIVES.all_to_all(back, expert_out, handle.works, s["send"], s["recv"], group=self.group)
        s["back"] = back

    def combine_wait(self, handle: Handle) -> torch.Tensor:
        handle.wait()
        s, back = handle.state, handle.state["back"]
        # each row to its (token, destination) place, then a fixed-order sum over destinations: deterministic,
        # unlike an index_add_ of several rows into one token (GPU atomics)
        rows = back.new_zeros(handle.num_tokens * self.size, back.shape[1])
        rows[s["token"] * self.size + s["dest"]] = back
        return rows.view(handle.num_tokens, self.size, back.shape[1]).sum(dim=1)
