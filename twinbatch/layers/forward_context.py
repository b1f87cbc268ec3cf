"""Everything one forward pass needs besides the tensors it transforms. Passed down explicitly, so every
microbatch carries its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from twinbatch.layers.attention import AttentionMetadata

ExpertGroup = tuple[int, int]  # local experts lo .. hi - 1


class Yields(Protocol):
    """Where a microbatch hands over to the next one (worker/ubatch/runtime.py UBatchContext)."""

    def yield_and_switch_from_compute_to_comm(self) -> None: ...

    def yield_and_switch_from_comm_to_compute(self) -> None: ...


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    max_tokens_across_dp: int  # the largest token count of any DP rank in this (micro)batch: all-to-all sizes
    ubatch: Yields | None = None  # set when this forward is one microbatch of a DBO step
    # single-batch overlap: the MoE layers' local experts in these groups, a round trip each (layers/moe.py); given
    # as numbers rather than a count, so that a compiled layer never derives them from a symbolic count
    expert_groups: tuple[ExpertGroup, ...] = ()
