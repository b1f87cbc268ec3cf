"""`all2allv`: variable split sizes, the "high-throughput" style.

Per-destination counts are exchanged first (the host reads them to size the buffers), then each rank sends
exactly the tokens that have an expert on the receiving rank: less traffic than fixed capacity for large
prefill batches, at the cost of one host synchronisation per dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twinbatch.distributed.all2all.base import All2AllBackend, ExpertInput, Handle
from twinbatch.distributed.collectives import COLLECTIVES


@dataclass
class VarHandle(Handle):
    token: torch.Tensor  # [pairs] the token of each (token, destination) pair sent, by destination then token
    dest: torch.Tensor  # [pairs] its destination rank
    send: list[int]  # pairs sent to each rank
    recv: list[int]  # pairs received from each rank
    x: torch.Tensor  # [sum(recv), hidden]
    meta: torch.Tensor  # [sum(recv), 2k] routing as this rank sees it (routing_for)
    back: torch.Tensor | None = None  # [sum(send), hidden] once combine is launched


class All2Allv(All2AllBackend):
    graph_capturable = False  # the host reads the split sizes

    def dispatch_launch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, max_tokens: int
    ) -> VarHandle:
        owner, mask = self.destinations(topk_ids)
        send_counts = mask.sum(dim=0)
        recv_counts = torch.empty_like(send_counts)
        counted: list = []
        COLLECTIVES.all_to_all(recv_counts, send_counts, counted, group=self.group)
        counted[0].wait()
        send, recv = send_counts.tolist(), recv_counts.tolist()
        dest, token = mask.t().nonzero(as_tuple=True)  # pairs ordered by destination, then token
        meta = self.routing_for(owner[token], topk_ids[token], topk_weights[token], dest)
        sends = (x[token], meta)
        handle = VarHandle(
            x.shape[0], [], token, dest, send, recv, *(t.new_empty(sum(recv), t.shape[1]) for t in sends)
        )
        for out, t in zip((handle.x, handle.meta), sends, strict=True):
            COLLECTIVES.all_to_all(out, t, handle.works, recv, send, group=self.group)
        return handle

    def dispatch_wait(self, handle: VarHandle) -> ExpertInput:
        handle.wait()
        weights, local_ids = self.split_routing(handle.meta)
        return ExpertInput(handle.x, weights, local_ids)

    def combine_launch(self, expert_out: torch.Tensor, handle: VarHandle) -> None:
        handle.back = expert_out.new_empty(sum(handle.send), expert_out.shape[1])
        COLLECTIVES.all_to_all(handle.back, expert_out, handle.works, handle.send, handle.recv, group=self.group)

    def combine_wait(self, handle: VarHandle) -> torch.Tensor:
        handle.wait()
        back = handle.back
        # each row to its (token, destination) place, then a fixed-order sum over destinations: deterministic,
        # unlike an index_add_ of several rows into one token (GPU atomics)
        rows = back.new_zeros(handle.num_tokens * self.size, back.shape[1])
        rows[handle.token * self.size + handle.dest] = back
        return rows.view(handle.num_tokens, self.size, back.shape[1]).sum(dim=1)
