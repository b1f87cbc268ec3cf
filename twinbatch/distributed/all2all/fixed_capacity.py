"""`all2all`: fixed-capacity exchange, the "low-latency" style.

Each rank sends every other rank a buffer of max_tokens rows (one per token of the busiest rank), filled with
the tokens that have at least one expert there; unused rows carry no expert. Slot positions are computed on the
device (cumulative sums), so nothing waits for the host and the step can be captured in a CUDA graph.
Hidden states and routing travel together, one collective each way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twinbatch.compilation import opaque
from twinbatch.distributed.all2all.base import All2AllBackend, ExpertInput, Handle
from twinbatch.distributed.collectives import COLLECTIVES
from twinbatch.ops import cumsum_rows, sum_rows


@dataclass
class CapacityHandle(Handle):
    target: torch.Tensor  # [num_tokens * size] send-buffer row of each (token, destination) pair; size * cap: none
    recv: torch.Tensor  # [size * cap, row bytes]: hidden state, then routing (_row_width)
    x: torch.Tensor  # the tokens sent: their dtype and width unpack the received rows
    back: torch.Tensor | None = None  # [size * cap, hidden] once combine is launched


class FixedCapacityAll2All(All2AllBackend):
    def dispatch_launch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, max_tokens: int
    ) -> CapacityHandle:
        target, send = self._pack(x, topk_weights, topk_ids, max_tokens)
        handle = CapacityHandle(x.shape[0], [], target, torch.empty_like(send), x)
        COLLECTIVES.all_to_all(handle.recv, send, handle.works, group=self.group)
        return handle

    def _pack(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, cap: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (target, send): where each (token, destination) pair went, and the send buffer, [size * cap, row]
        bytes. A row holds a token's hidden state, then its routing as the destination sees it ([2k] float32,
        routing_for), so both travel in one collective; _row_width says where the routing starts."""
        (n, hidden), size, k = x.shape, self.size, topk_ids.shape[1]
        owner, mask = self.destinations(topk_ids)  # mask [n, size]
        ranks = torch.arange(size, device=x.device)
        # [n, size] row of each (token, destination) pair in the send buffer; pairs not sent go to a spare row
        target = torch.where(mask, ranks * cap + cumsum_rows(mask.long()) - 1, size * cap).flatten()
        send_x = x.new_zeros(size * cap + 1, _row_width(x) // x.element_size())
        send_x[target, :hidden] = x[:, None, :].expand(n, size, hidden).reshape(n * size, hidden)
        send_meta = torch.cat([x.new_full((size * cap + 1, k), self.num_experts, dtype=torch.float32),
                               x.new_zeros(size * cap + 1, k, dtype=torch.float32)], dim=1)  # fmt: skip
        pairs = self.routing_for(owner.repeat_interleave(size, 0), topk_ids.repeat_interleave(size, 0),
                                 topk_weights.repeat_interleave(size, 0), ranks.repeat(n))  # fmt: skip
        send_meta[target] = pairs
        send = torch.cat([send_x.view(torch.uint8), send_meta.view(torch.uint8)], dim=1)
        return target, send[:-1]

    def dispatch_wait(self, handle: CapacityHandle) -> ExpertInput:
        recv_x, recv_meta = _wait_and_unpack(handle)
        weights, local_ids = self.split_routing(recv_meta)
        return ExpertInput(recv_x, weights, local_ids)

    def combine_launch(self, expert_out: torch.Tensor, handle: CapacityHandle) -> None:
        handle.back = torch.empty_like(expert_out)
        COLLECTIVES.all_to_all(handle.back, expert_out, handle.works, group=self.group)

    def combine_wait(self, handle: CapacityHandle) -> torch.Tensor:
        handle.wait()
        back = handle.back
        rows = torch.cat([back, back.new_zeros(1, back.shape[1])])[handle.target]
        return sum_rows(rows.view(handle.num_tokens, self.size, back.shape[1]))


@opaque  # one graph break for both; views of another dtype stay out of graphs (torch 2.11 could not rebuild them)
def _wait_and_unpack(handle: CapacityHandle) -> tuple[torch.Tensor, torch.Tensor]:
    """Waits for the dispatch, then splits the received rows, [size * cap, row] bytes -> (hidden states [rows,
    hidden] in the sender's dtype, routing [rows, 2k] float32), views of the receive buffer."""
    handle.wait()
    recv, x = handle.recv, handle.x
    width = _row_width(x)
    return recv[:, :width].view(x.dtype)[:, : x.shape[1]], recv[:, width:].view(torch.float32)


def _row_width(x: torch.Tensor) -> int:
    """Bytes of a hidden state in a send row, rounded up to 4 so the float32 routing after it stays aligned."""
    return -(-x.shape[1] * x.element_size() // 4) * 4
