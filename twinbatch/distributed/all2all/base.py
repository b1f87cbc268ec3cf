"""The expert-parallel all-to-all interface: dispatch and combine, each split into a launch and a wait half.

Between launch and wait the caller (the MoE layer) may do other work: the shared experts, or the other
microbatch under DBO. Every per-call tensor lives in the handle, so two microbatches can have calls in flight at
once; the backend itself holds only the group and the expert layout, so one instance serves every layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist

from twinbatch.compilation import opaque


@dataclass
class ExpertInput:
    """What this rank's experts compute on after dispatch."""

    x: torch.Tensor  # [num_recv, hidden]
    topk_weights: torch.Tensor  # [num_recv, k] float32
    local_ids: torch.Tensor  # [num_recv, k] int64; ids outside [0, num_local_experts) are not this rank's


@dataclass
class Handle:
    """One dispatch/combine round trip: its pending collectives; each backend's subclass adds what it must
    remember between the halves."""

    num_tokens: int
    works: list[dist.Work]

    @opaque
    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


class All2AllBackend(ABC):
    supports_dbo = True  # its launch and wait halves can be separated by a yield to another microbatch
    graph_capturable = True  # nothing waits for the host: a step using it can be a CUDA graph
    supports_sbo = True  # several dispatch/combine round trips of one batch can be in flight at once

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
