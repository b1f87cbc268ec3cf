"""Tensor operations shared by the MoE layers and the all-to-all backends. Each has a fixed output size and a
fixed order of additions: nothing waits for the device (CUDA-graph safe) and results do not change from run to
run (no atomics deciding the order of a sum)."""

from __future__ import annotations

import functools
import operator

import torch

RANK_SORT_MAX_PAIRS = 8192  # above this, comparing every pair with every other costs more than a sort


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """How often each id in [0, n) occurs (others are ignored), as a fixed-size [n] tensor. Unlike bincount,
    whose output size depends on the data, this never waits for the device."""
    counts = torch.zeros(n + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids.clamp(0, n), torch.ones_like(ids, dtype=torch.int64))
    return counts[:n]


@torch.library.custom_op("twinbatch::cumsum_rows", mutates_args=())
def cumsum_rows(t: torch.Tensor) -> torch.Tensor:
    """t.cumsum(0) in t's dtype for a t [n, few], one opaque kernel under torch.compile (no graph break), scanned
    along the contiguous dim: faster than Inductor's scan along dim 0 (docs/performance.md, kernel choices)."""
    return t.t().contiguous().cumsum(1, dtype=t.dtype).t().contiguous()


@cumsum_rows.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def sum_rows(t: torch.Tensor) -> torch.Tensor:
    """t [n, k, H] -> [n, H] in t's dtype: the k rows of each token added in float32, in a fixed order. Written
    out over k: as a reduction over the middle dim, Inductor loads the rows uncoalesced."""
    return functools.reduce(operator.add, t.float().unbind(1)).to(t.dtype)


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [pairs] -> (order: the stable argsort of ids, ids >= num_experts last; offs [num_experts] int32: the
    end row of each expert's run in that order). No host synchronisation.

    Under torch.compile, for decode-sized inputs, a rank sort: each pair's row is the start of its id's run
    plus the number of equal ids before it, which Inductor computes as one reduction over the pairs x pairs
    comparison without materialising it (every pair in parallel), where a cumulative sum over a one-hot table
    would scan along the long axis. Eager steps keep the (radix) sort."""
    ids = ids.clamp(0, num_experts)  # every skipped id the same, so both ways give the same order
    counts = count_ids(ids, num_experts + 1)  # the skipped ids counted too: their run comes last
    ends = counts.cumsum(0)
    if not torch.compiler.is_compiling() or ids.numel() > RANK_SORT_MAX_PAIRS:
        return ids.argsort(stable=True), ends[:num_experts].to(torch.int32)
    index = torch.arange(ids.numel(), device=ids.device)
    before = ((ids[None, :] == ids[:, None]) & (index[None, :] < index[:, None])).sum(1)
    order = torch.empty_like(ids)
    order[ends[ids] - counts[ids] + before] = index
    return order, ends[:num_experts].to(torch.int32)
