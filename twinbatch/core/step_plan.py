"""How one step runs, decided in one place: the overlap mode and why, the microbatch bounds, the CUDA graph (or
eager), and the token counts across DP ranks.

Each rank votes on microbatching before the per-step DP sync (the decode threshold for a batch of pure decodes,
the prefill threshold otherwise); the votes ride on the sync's all-reduce with the token counts, and every rank
then applies `StepPlanner.plan` to the same numbers, so they never disagree about the collectives to run.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import itertools
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twinbatch.config import ParallelConfig
from twinbatch.core.dp_sync import StepSync
from twinbatch.core.overlap_tuner import OverlapTuner
from twinbatch.core.scheduler import SchedulerOutput

# ("decode", batch bucket, context bucket, mode label) or ("prefill", token bucket, request rows, mode label)
GraphKey = tuple[str, int, int, str]


class OverlapMode(enum.Enum):
    OFF = "off"  # one forward over the whole batch
    DBO = "dbo"  # dual-batch overlap: microbatches that take turns computing and communicating
    # single-batch overlap: the local experts in rounds, one round's tokens travelling while another computes
    SBO = "sbo"


class Reason(enum.Enum):
    """Why a step ran as it did (counted per step in LLMEngine.get_stats()["dbo"])."""

    MICROBATCHED = "microbatched"
    BELOW_THRESHOLD = "below_threshold"
    RANK_DISAGREED = "rank_disagreed"  # this rank voted yes, another no
    EMPTY_MICROBATCH = "empty_microbatch"  # some rank's last microbatch would hold only padding
    NOT_SUPPORTED = "not_supported"  # requests sharing KV blocks: a microbatch could read what a later one writes
    DISABLED = "disabled"  # DBO is off
    CONFIGURED = "configured"  # the mode --overlap names, taken by every step (sbo)
    AUTO_TRIAL = "auto_trial"  # --overlap auto measuring the modes of this step's shape (core/overlap_tuner.py)
    AUTO_FASTEST = "auto_fastest"  # --overlap auto running the fastest mode it measured for this shape
    FORCED = "forced"  # the planner's `force` chose the mode (bench step)


@dataclass(frozen=True)
class GraphStep:
    """A step run as a CUDA graph, as every DP rank agreed: `tokens` is its token bucket. A prefill graph takes
    the packed attention layout, whose gather of every request's context is bounded by `context` rows
    (AttentionMetadata.context_bound)."""

    tokens: int
    prefill: bool = False
    context: int = 0  # prefill graphs only


@dataclass(frozen=True)
class StepPlan:
    batch: SchedulerOutput
    mode: OverlapMode
    reason: Reason
    num_tokens: int  # this rank's tokens, padding included: the forward's size
    max_tokens_across_dp: int  # the largest of any rank: the all-to-all buffers' size
    ubatch_bounds: tuple[int, ...]  # token offsets of the microbatches: (0, num_tokens) for one
    graph: GraphStep | None  # the CUDA graph the step replays as; None: eager
    sbo_rounds: int = 1  # round trips of the MoE layers' experts: > 1 only in SBO

    @property
    def label(self) -> str:
        """The mode with its shape: "off", "dbo", "sbo2" (SBO in 2 rounds); CUDA graphs are keyed by it."""
        return self.mode.value + (str(self.sbo_rounds) if self.mode is OverlapMode.SBO else "")

    @property
    def pad_requests(self) -> int:
        """Tokens per padding request: a decode graph pads with one-token requests; other steps with tokens
        that belong to no request."""
        return 1 if self.graph is not None and not self.graph.prefill else 0

    @property
    def packed(self) -> GraphStep | None:
        """The prefill graph whose packed attention layout the inputs take, if any."""
        return self.graph if self.graph is not None and self.graph.prefill else None


def ubatch_bounds(num_tokens: int, num_ubatches: int) -> list[int]:
    """Token offsets of num_ubatches near-equal slices of [0, num_tokens); the earlier slices take the remainder."""
    size, extra = divmod(num_tokens, num_ubatches)
    bounds = [0]
    for i in range(num_ubatches):
        bounds.append(bounds[-1] + size + (i < extra))
    return bounds


def last_ubatch_empty(num_tokens: int, padded_tokens: int, num_ubatches: int) -> bool:
    """True when, cut into num_ubatches near-equal slices, the last slice of the padded range holds no real token."""
    return ubatch_bounds(padded_tokens, num_ubatches)[-2] >= num_tokens


def decide(my_reason: Reason | None, counts: list[int], votes: list[bool], num_ubatches: int) -> Reason:
    """Whether the step microbatches, as this rank sees it; MICROBATCHED on one rank means MICROBATCHED on all."""
    if my_reason is not None:
        return my_reason
    if not all(votes):
        return Reason.RANK_DISAGREED
    padded = max(counts)
    if any(last_ubatch_empty(n, padded, num_ubatches) for n in counts):
        return Reason.EMPTY_MICROBATCH
    return Reason.MICROBATCHED


class GraphBuckets:
    """The step sizes CUDA graphs are captured for. Decode graphs: powers of two up to the batch rows, keyed also
    by a context bucket (powers of two from 256) that bounds the batched attention's gather. Prefill graphs:
    powers of two from 16 up to 512 tokens, then steps of 512 up to the token budget."""

    def __init__(self, max_decode_tokens: int, max_model_len: int, max_prefill_tokens: int) -> None:
        self.batch = _power_of_two_buckets(max_decode_tokens)
        self.context = _power_of_two_buckets(max_model_len, start=256)
        self.prefill = _prefill_buckets(max_prefill_tokens)

    def batch_bucket(self, num_tokens: int) -> int | None:
        return next((b for b in self.batch if b >= num_tokens), None)

    def context_bucket(self, max_seq_len: int) -> int:
        return next(c for c in self.context if c >= max_seq_len)

    def keys(self, labels: list[str], max_rows: Callable[[int], int], ubatch_size: int) -> list[GraphKey]:
        """Every graph a step in one of the modes `labels` can replay, in a fixed order: decode graphs of each
        batch and context bucket; prefill graphs of each token bucket at 1, 4, 16, ... request rows up to
        max_rows(tokens); DBO only at buckets of at least one token a microbatch."""
        steps = [("decode", b, c) for b in self.batch for c in self.context]
        steps += [("prefill", t, r) for t in self.prefill for r in _powers_of_4(max_rows(t))]
        return [(kind, b, c, label) for (kind, b, c), label in itertools.product(steps, labels)
                if label != "dbo" or b >= ubatch_size]  # fmt: skip

    def prefill_bucket(self, context_tokens: int) -> int | None:
        """The token bucket of a prefill graph whose requests' contexts (new tokens included) sum to
        context_tokens; None past the token budget: such steps run eagerly."""
        return next((b for b in self.prefill if b >= context_tokens), None)


@dataclass(frozen=True)
class StepPlanner:
    """parallel: the overlap options; buckets: the CUDA-graph sizes, None where steps run eagerly; force: run every
    step in this mode whatever the votes (bench step measures each mode on the same batch); tuner: the choice of
    --overlap auto (made with auto_tuner)."""

    parallel: ParallelConfig
    buckets: GraphBuckets | None = None
    force: OverlapMode | None = None
    tuner: OverlapTuner | None = None

    def vote(self, batch: SchedulerOutput) -> Reason | None:
        """This rank's proposal, before the DP sync: None votes to microbatch; otherwise the reason it does not.
        An idle rank's dummy batch votes no."""
        cfg = self.parallel
        if not cfg.enable_dbo:
            return Reason.DISABLED
        if _shares_kv_blocks(batch):
            return Reason.NOT_SUPPORTED
        threshold = cfg.dbo_decode_token_threshold if batch.decode_only else cfg.dbo_prefill_token_threshold
        threshold = cfg.ubatch_size if cfg.overlap == "auto" else threshold  # auto measures instead
        return None if batch.num_tokens >= threshold else Reason.BELOW_THRESHOLD

    @functools.cached_property
    def _options_key(self) -> int:
        cfg, b = self.parallel, self.buckets
        options = (cfg.overlap, cfg.sbo_rounds, cfg.ubatch_size, cfg.all2all_backend,
                   b and (b.batch, b.context, b.prefill), self.force)  # fmt: skip
        return zlib.crc32(repr(options).encode())

    def key(self) -> int:
        """A checksum of what the plan depends on besides the synced numbers: the overlap options, the graph
        sizes, and what --overlap auto's tuner has measured; and the all-to-all backend, which runs the plan's
        collectives. Ranks with equal keys plan every step alike."""
        return self._options_key if self.tuner is None else zlib.crc32(b"%d" % self.tuner.digest, self._options_key)

    def check(self, sync: StepSync) -> None:
        """Raises, on every rank alike, where the ranks' keys (synced) differ: they would plan steps differently."""
        if len(set(sync.plan_keys)) > 1:
            cfg = self.parallel
            raise RuntimeError(
                f"DP ranks would plan this step differently: launch all with the same --overlap, --sbo-rounds, "
                f"--all2all-backend and graph sizes (this one: {cfg.overlap}, {cfg.sbo_rounds}, {cfg.all2all_backend}"
                f", {self.buckets and self.buckets.batch}); or --overlap auto's tuners diverged (keys {sync.plan_keys})"
            )

    def plan(self, batch: SchedulerOutput, vote: Reason | None, sync: StepSync) -> StepPlan:
        """The step as every rank runs it, from this rank's batch and vote and the numbers all ranks synced.
        Raises (check) before any layer runs where the ranks' keys differ."""
        self.check(sync)
        n, rounds = self.parallel.ubatch_size, self.parallel.sbo_rounds
        if self.force is not None:
            mode, reason = self.force, Reason.FORCED
        elif self.parallel.overlap == "sbo":
            mode, reason = OverlapMode.SBO, Reason.CONFIGURED
        elif self.tuner is not None:
            mode, reason, rounds = self._auto(vote, sync)
        else:
            reason = decide(vote, sync.num_tokens_across_dp, sync.ubatch_votes, n)
            mode = OverlapMode.DBO if reason is Reason.MICROBATCHED else OverlapMode.OFF
        graph = self.graph(sync)
        if graph is not None:
            tokens = max_tokens = graph.tokens
        else:
            max_tokens = sync.max_tokens
            tokens = max_tokens if mode is OverlapMode.DBO else max(batch.num_tokens, 1)
        bounds = ubatch_bounds(tokens, n) if mode is OverlapMode.DBO else [0, tokens]
        rounds = rounds if mode is OverlapMode.SBO else 1
        return StepPlan(batch, mode, reason, tokens, max_tokens, tuple(bounds), graph, rounds)

    def _auto(self, vote: Reason | None, sync: StepSync) -> tuple[OverlapMode, Reason, int]:
        """The tuner's mode for this step's shape, after handing it the time of the step before (the slowest
        rank's, as synced). DBO runs only where every rank can split its batch; else the step runs unsplit."""
        shape = ("decode" if all(sync.decode_only) else "prefill", 1 << max(sync.max_tokens - 1, 0).bit_length())
        label, why = self.tuner.step(shape, sync.slowest_step_us / 1e3)
        reason = Reason(why)
        mode, rounds = parse_label(label)
        if mode is OverlapMode.DBO:
            outcome = decide(vote, sync.num_tokens_across_dp, sync.ubatch_votes, self.parallel.ubatch_size)
            if outcome is not Reason.MICROBATCHED:
                self.tuner.refused()
                return OverlapMode.OFF, outcome, 1
        return mode, reason, rounds

    def graph_labels(self) -> list[str]:
        """The modes whose CUDA graphs steps may replay (step_labels)."""
        return step_labels(self.parallel)

    def graph(self, sync: StepSync) -> GraphStep | None:
        """A decode graph when every rank has only decodes (or nothing) and the largest batch fits a bucket; else
        a prefill graph when every rank's tokens and its requests' contexts (new tokens included) fit the token
        budget; else None (eager), as always where there are no graphs."""
        if self.buckets is None:
            return None
        if all(sync.decode_only) and (bucket := self.buckets.batch_bucket(sync.max_tokens)) is not None:
            return GraphStep(bucket)
        bucket = self.buckets.prefill_bucket(max(sync.max_tokens, *sync.context_tokens))
        return GraphStep(bucket, prefill=True, context=bucket) if bucket is not None else None


def parse_label(label: str) -> tuple[OverlapMode, int]:
    """A StepPlan label -> (mode, SBO rounds): "sbo2" -> (SBO, 2), "dbo" -> (DBO, 1)."""
    if label.startswith("sbo"):
        return OverlapMode.SBO, int(label.removeprefix("sbo"))
    return OverlapMode(label), 1


def uniform_plan(
    parallel: ParallelConfig, buckets: GraphBuckets | None, batch: SchedulerOutput, mode: OverlapMode, rounds: int,
    tokens: int, decode_only: bool, context: int,
) -> StepPlan:  # fmt: skip
    """The plan of `batch` in `mode` (SBO in `rounds`) where every DP rank has `tokens` tokens, `context` context
    tokens and decode_only alike: what every rank's planner makes of those synced numbers, whatever the votes
    (bench step measures each mode on the same batch; graphs are captured at start-up from padding steps)."""
    planner = StepPlanner(dataclasses.replace(parallel, sbo_rounds=rounds), buckets, force=mode)
    dp = parallel.data_parallel_size
    sync = StepSync([tokens] * dp, [True] * dp, [decode_only] * dp, [context] * dp, stop=False)
    return planner.plan(batch, None, sync)


def step_labels(parallel: ParallelConfig) -> list[str]:
    """The modes a step may run, as StepPlan labels: every step's under sbo; off and dbo under dbo; off, dbo and
    SBO in --sbo-rounds rounds (if more than one) under auto; off otherwise."""
    sbo = f"sbo{parallel.sbo_rounds}"
    if parallel.overlap == "sbo":
        return [sbo]
    auto_sbo = [sbo] if parallel.overlap == "auto" and parallel.sbo_rounds > 1 else []
    return ["off", *(["dbo"] if parallel.enable_dbo else []), *auto_sbo]


def auto_tuner(parallel: ParallelConfig) -> OverlapTuner | None:
    """The tuner of --overlap auto, its candidates every mode a step may run (step_labels); None otherwise."""
    return OverlapTuner(step_labels(parallel)) if parallel.overlap == "auto" else None


def _shares_kv_blocks(batch: SchedulerOutput) -> bool:
    blocks = [b for s in batch.scheduled for b in s.request.block_ids]
    return len(blocks) != len(set(blocks))


def _powers_of_4(limit: int) -> list[int]:
    """1, 4, 16, ... up to limit, which ends the list."""
    rows = [1]
    while rows[-1] < limit:
        rows.append(min(4 * rows[-1], limit))
    return rows


def _power_of_two_buckets(limit: int, start: int = 1) -> list[int]:
    buckets, b = [], start
    while b < limit:
        buckets.append(b)
        b *= 2
    return [*buckets, limit]


def _prefill_buckets(limit: int) -> list[int]:
    """Powers of two up to 512 tokens, then steps of 512: a step pads by less than 512 tokens past that."""
    small = _power_of_two_buckets(min(limit, 512), start=16)
    return [*small, *range(1024, limit, 512), limit] if limit > 512 else small


def overlap_counts(counts: Iterable[tuple[tuple[str, str], int]]) -> dict[str, dict[str, int]]:
    """((mode, reason), steps) pairs -> {mode: {reason: steps}}, summed, sorted."""
    out: dict[str, dict[str, int]] = {}
    for (mode, reason), steps in sorted(counts):
        out.setdefault(mode, {})[reason] = out.get(mode, {}).get(reason, 0) + steps
    return out
