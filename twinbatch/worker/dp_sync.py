"""The one small all-reduce every DP rank makes per step, before the model runs.

It carries each rank's token count (so all ranks know whether anyone has work, and how large the all-to-all
buffers must be) and a stop flag (so all ranks leave their loop on the same step). Ranks with nothing to do
still call it, and run a dummy batch when anyone has work, so the collectives inside the model always match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepSync:
    num_tokens_across_dp: list[int]
    stop: bool

    @property
    def any_work(self) -> bool:
        return any(self.num_tokens_across_dp)

    @property
    def max_tokens(self) -> int:
        return max(self.num_tokens_across_dp)


class DPSync:
    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    def sync(self, num_tokens: int, stop: bool = False) -> StepSync:
        if self.group is None:
            return StepSync([num_tokens], stop)
        t = torch.zeros(self.size + 1, dtype=torch.int64)  # [tokens of rank 0 .. size-1, stop votes]
        t[self.rank], t[self.size] = num_tokens, int(stop)
        dist.all_reduce(t, group=self.group)
        counts = t.tolist()
        return StepSync(counts[: self.size], counts[self.size] > 0)
