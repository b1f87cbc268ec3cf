"""The one small all-reduce every DP rank makes per step, before the model runs.

It carries each rank's token count (so all ranks know whether anyone has work, and how large the all-to-all
buffers must be), each rank's vote to microbatch (dual-batch overlap), and a stop flag (so all ranks leave
their loop on the same step). Ranks with nothing to do
still call it, and run a dummy batch when anyone has work, so the collectives inside the model always match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepSync:
    num_tokens_across_dp: list[int]
    ubatch_votes: list[bool]
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

    def sync(self, num_tokens: int, stop: bool = False, ubatch_vote: bool = False) -> StepSync:
        if self.group is None:
            return StepSync([num_tokens], [ubatch_vote], stop)
        n = self.size
        t = torch.zeros(2 * n + 1, dtype=torch.int64)  # [tokens of each rank, ubatch vote of each rank, stop votes]
        t[self.rank], t[n + self.rank], t[2 * n] = num_tokens, int(ubatch_vote), int(stop)
        dist.all_reduce(t, group=self.group)
        values = t.tolist()
        return StepSync(values[:n], [bool(v) for v in values[n : 2 * n]], values[2 * n] > 0)
