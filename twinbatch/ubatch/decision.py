"""Whether a step runs as microbatches: a vote per DP rank, decided identically on every rank.

Each rank votes yes when its batch reaches the threshold (the decode threshold for a batch of pure decodes,
the prefill threshold otherwise). The votes ride on the per-step DP all-reduce with the token counts; every
rank then applies the same rule to the same numbers, so they never disagree about the collectives to run.
"""

from __future__ import annotations

import enum

from twinbatch.config import ParallelConfig
from twinbatch.worker.scheduler import SchedulerOutput


class Reason(enum.Enum):
    MICROBATCHED = "microbatched"
    BELOW_THRESHOLD = "below_threshold"
    RANK_DISAGREED = "rank_disagreed"  # this rank voted yes, another no
    EMPTY_MICROBATCH = "empty_microbatch"  # some rank's last microbatch would hold only padding
    NOT_SUPPORTED = "not_supported"  # e.g. requests sharing KV blocks: a microbatch could read what a later one writes


def vote(batch: SchedulerOutput, cfg: ParallelConfig) -> Reason | None:
    """None votes yes; otherwise the reason this rank votes no. An idle rank's dummy batch votes no."""
    if _shares_kv_blocks(batch):
        return Reason.NOT_SUPPORTED
    pure_decode = all(s.num_new_tokens == 1 for s in batch.scheduled)
    threshold = cfg.dbo_decode_token_threshold if pure_decode else cfg.dbo_prefill_token_threshold
    return None if batch.num_tokens >= threshold else Reason.BELOW_THRESHOLD


def _shares_kv_blocks(batch: SchedulerOutput) -> bool:
    blocks = [b for s in batch.scheduled for b in s.request.block_ids]
    return len(blocks) != len(set(blocks))


def last_ubatch_empty(num_tokens: int, padded_tokens: int, num_ubatches: int) -> bool:
    """True when, cut into num_ubatches near-equal slices, the last slice of the padded range holds no real token."""
    return ubatch_bounds(padded_tokens, num_ubatches)[-2] >= num_tokens


def ubatch_bounds(num_tokens: int, num_ubatches: int) -> list[int]:
    """Token offsets of num_ubatches near-equal slices of [0, num_tokens); the earlier slices take the remainder."""
    size, extra = divmod(num_tokens, num_ubatches)
    bounds = [0]
    for i in range(num_ubatches):
        bounds.append(bounds[-1] + size + (i < extra))
    return bounds


def decide(my_reason: Reason | None, counts: list[int], votes: list[bool], num_ubatches: int) -> Reason:
    """The step's outcome as this rank sees it; MICROBATCHED on one rank means MICROBATCHED on all."""
    if my_reason is not None:
        return my_reason
    if not all(votes):
        return Reason.RANK_DISAGREED
    padded = max(counts)
    if any(last_ubatch_empty(n, padded, num_ubatches) for n in counts):
        return Reason.EMPTY_MICROBATCH
    return Reason.MICROBATCHED
