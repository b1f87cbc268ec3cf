"""The one small all-reduce every DP rank makes per step, before the model runs.

It carries each rank's token count (so all ranks know whether anyone has work, and how large the all-to-all
buffers must be), each rank's vote to microbatch (dual-batch overlap), the time its last step took (so the
automatic overlap choice sees the same, slowest, time on every rank), its step planner's key (so ranks that
would choose different overlap modes stop before any layer runs), and a stop flag (so all ranks leave their loop
on the same step). Ranks with nothing to do
still call it, and run a dummy batch when anyone has work, so the collectives inside the model always match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class StepSync:
    num_tokens_across_dp: list[int]
    ubatch_votes: list[bool]
    decode_only: list[bool]  # every rank's batch is pure decode (or empty): a CUDA-graph step is possible
    context_tokens: list[int]  # the sum of each rank's requests' contexts, new tokens included: prefill graphs
    stop: bool
    step_us: list[int] = field(default_factory=list)  # each rank's last step, microseconds (0: none measured)
    plan_keys: list[int] = field(default_factory=list)  # each rank's StepPlanner.key()

    @property
    def slowest_step_us(self) -> int:
        return max(self.step_us, default=0)

    @property
    def any_work(self) -> bool:
        return any(self.num_tokens_across_dp)

    @property
    def max_tokens(self) -> int:
        return max(self.num_tokens_across_dp)


class DPSync:
    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    def sync(
        self,
        num_tokens: int,
        stop: bool = False,
        ubatch_vote: bool = False,
        decode_only: bool = False,
        context_tokens: int = 0,
        step_us: int = 0,
        plan_key: int = 0,
    ) -> StepSync:
        fields = (num_tokens, ubatch_vote, decode_only, context_tokens, step_us, plan_key)
        if self.group is None:
            return StepSync([num_tokens], [ubatch_vote], [decode_only], [context_tokens], stop, [step_us], [plan_key])
        n, r = self.size, self.rank
        # each field of each rank (field f of rank r at f * n + r), then stop
        t = torch.zeros(len(fields) * n + 1, dtype=torch.int64)
        t[r : len(fields) * n : n] = torch.tensor(fields, dtype=torch.int64)
        t[-1] = stop
        dist.all_reduce(t, group=self.group)
        v = t.tolist()
        tokens, votes, decode, context, step, keys = (v[f * n : (f + 1) * n] for f in range(len(fields)))
        return StepSync(tokens, [bool(x) for x in votes], [bool(x) for x in decode], context, v[-1] > 0, step, keys)
