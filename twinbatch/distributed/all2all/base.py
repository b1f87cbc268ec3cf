"""The expert-parallel all-to-all interface: dispatch and combine, each split into a launch and a wait half.

Between launch and wait the caller may do other work (shared experts, the other microbatch under DBO). Every
per-call tensor lives in the handle, so two microbatches can have calls in flight at once.
"""

from __future__ import annotations

import functools
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from twinbatch.compilation import opaque

if TYPE_CHECKING:
    from twinbatch.forward_context import ForwardContext


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each id in [0, n) occurs (others are ignored), as a fixed-size [n] tensor. Unlike bincount,
    whose output size depends on the data, this never waits for the device (CUDA-graph safe)."""
    counts = torch.zeros(n + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.clamp(0, n), torch.ones_like(ids, dtype=torch.int64))
    return counts[:n]


@torch.library.custom_op("twinbatch::cumsum_rows", mutates_args=())
def cumsum_rows(t: torch.Tensor) -> torch.Tensor:
    """t.cumsum(0) in t's dtype for a t [n, few], one opaque kernel under torch.compile (no graph break), scanned
    along the contiguous dim. For a 4096-token prefill's [tokens, 2 ranks] mask on H200: Inductor's scan along
    dim 0 takes 147 us, eager cumsum(0) 390 us, Inductor along the transposed dim 158 us, this 50 us."""
    return t.t().contiguous().cumsum(1, dtype=t.dtype).t().contiguous()


@cumsum_rows.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def sum_rows(t: torch.Tensor) -> torch.Tensor:
    """t [n, k, H] -> [n, H] in t's dtype: the k rows of each token added in float32, in a fixed order. Written
    out over k: as a reduction over the middle dim, Inductor loaded the rows uncoalesced (40 to 50 us a layer on
    H200 for a decode step's rows)."""
    return functools.reduce(operator.add, t.float().unbind(1)).to(t.dtype)


@dataclass
class ExpertInput:
    """What this rank's experts compute on after dispatch."""

    x: torch.Tensor  # [num_recv, hidden]
    topk_weights: torch.Tensor  # [num_recv, k] float32
    local_ids: torch.Tensor  # [num_recv, k] int64; ids outside [0, num_local_experts) are not this rank's


@dataclass
class Handle:
    """One dispatch/combine round trip: pending collectives plus whatever the backend must remember."""

    num_tokens: int
    works: list[dist.Work] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    @opaque
    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


class All2AllBackend(ABC):
    supports_dbo = True  # its launch and wait halves can be separated by a yield to another microbatch

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.size
        self.expert_offset = self.rank * self.num_local_experts

    def to_local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> this rank's local ids; other ranks' experts map to num_local_experts (skipped)."""
        local = topk_ids - self.expert_offset
        return local.masked_fill((local < 0) | (local >= self.num_local_experts), self.num_local_experts)

    def destinations(self, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> owner [num_tokens, k], the EP rank of each chosen expert, and mask [num_tokens, ep_size], whether
        a token goes to a rank at all (once per rank, however many of its experts live there)."""
        owner = topk_ids // self.num_local_experts
        ranks = torch.arange(self.size, device=topk_ids.device)
        return owner, (owner[:, :, None] == ranks).any(dim=1)

    def routing_for(self, owner: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                    ranks: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Each row's ids and weights as seen by rank ranks[row]: [rows, 2k] float32, ids first; experts of
        other ranks become id num_experts with weight 0. Float ids are exact below 2**24 experts."""
        mine = owner == ranks[:, None]
        ids = topk_ids.masked_fill(~mine, self.num_experts).float()
        return torch.cat([ids, topk_weights.float().masked_fill(~mine, 0.0)], dim=-1)

    def split_routing(self, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of routing_for on the receiving side -> (weights, local ids)."""
        k = meta.shape[1] // 2
        return meta[:, k:], self.to_local_ids(meta[:, :k].long())

    def dispatch(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        ctx: ForwardContext,
        while_in_flight: Callable[[], torch.Tensor] | None = None,
    ) -> tuple[ExpertInput, Handle, torch.Tensor | None]:
        """Launch, run `while_in_flight` (the shared experts) and, under DBO, yield to the next microbatch, then
        wait. Returns the experts' input, the handle for combine, and while_in_flight's result."""
        handle = self.dispatch_launch(x, topk_weights, topk_ids, ctx.max_tokens_across_dp)
        extra = while_in_flight() if while_in_flight is not None else None
        if ctx.ubatch is not None:
            ctx.ubatch.yield_and_switch_from_compute_to_comm()  # the other microbatch computes meanwhile
        return self.dispatch_wait(handle), handle, extra

    def combine(self, expert_out: torch.Tensor, handle: Handle, ctx: ForwardContext) -> torch.Tensor:
        self.combine_launch(expert_out, handle)
        if ctx.ubatch is not None:
            ctx.ubatch.yield_and_switch_from_comm_to_compute()
        return self.combine_wait(handle)

    @abstractmethod
    def dispatch_launch(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, max_tokens: int
    ) -> Handle:
        """Starts sending tokens to the ranks that own their experts; max_tokens is the largest token count
        of any rank this step (known from the DP sync, so no extra host synchronisation is needed)."""

    @abstractmethod
    def dispatch_wait(self, handle: Handle) -> ExpertInput: ...

    @abstractmethod
    def combine_launch(self, expert_out: torch.Tensor, handle: Handle) -> None:
        """Starts sending the experts' routing-weighted sums [num_recv, hidden] back to the tokens' ranks."""

    @abstractmethod
    def combine_wait(self, handle: Handle) -> torch.Tensor:
        """-> [num_tokens, hidden], each token's sum over all its experts."""
