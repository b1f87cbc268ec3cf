"""`--overlap auto`: the overlap mode of each step shape, chosen by timing the candidates on real steps.

A shape is the phase (decode, or any step with a prefill) and the token bucket of the largest rank's batch. For
each shape the tuner first tries every candidate (off, dbo, and SBO in --sbo-rounds rounds) TRIALS times after one
untimed warm-up step each (its first step may capture a CUDA graph or compile), then keeps the fastest by median.
It keeps a mode other than off only where that mode beats off by MARGIN. It measures again after RECHECK_STEPS
steps of the shape, and at once when the kept mode's recent median drifts DRIFT above what it measured.

Every DP rank runs one tuner and feeds it the same numbers: the time of each step as the per-step DP sync
reports it, the slowest rank's. So every rank makes the same choice for every step, and no extra collective is
needed to agree. That this holds is checked, not assumed: the tuner's state follows from what it was told, so
`digest`, a checksum of everything it was told, is equal on two ranks exactly when their choices will be (the
step planner sends it in the DP sync).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

TRIALS = 3  # timed steps of each candidate per shape
MARGIN = 0.02  # a mode is kept over off only if its median is this much below off's
RECHECK_STEPS = 2000  # steps of a shape between two measurements
DRIFT = 1.10  # the kept mode's recent median over its measured one that starts a new measurement
RECENT = 16  # steps of the kept mode its drift is judged on
GIVE_UP = 3  # asks for a candidate that ran as another mode (DBO refused by a rank) before it is dropped


@dataclass
class _Shape:
    candidates: list[str]
    samples: dict[str, list[float]] = field(default_factory=dict)  # timed steps of the current measurement
    refused: dict[str, int] = field(default_factory=dict)  # asks that ran as another mode
    kept: str | None = None
    kept_ms: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    steps_since: int = 0

    def next_trial(self) -> str | None:
        """The candidate still to measure, one step at a time in turn; None once all are measured."""
        pending = [c for c in self.candidates if len(self.samples.get(c, ())) < TRIALS + 1]
        return min(pending, key=lambda c: len(self.samples.get(c, ())), default=None)


class OverlapTuner:
    def __init__(self, candidates: list[str]) -> None:
        self.candidates = candidates  # StepPlan labels; "off" first
        self.shapes: dict[tuple[str, int], _Shape] = {}
        # (shape, mode asked for, mode it ran as) of each step planned whose time has not arrived yet, oldest first:
        # one step's with synchronous scheduling, two with asynchronous, where a step finishes a call later
        self.asks: deque[tuple[tuple[str, int], str, str]] = deque()
        self.digest = zlib.crc32(repr(candidates).encode())  # of the candidates and every step recorded

    def step(self, shape: tuple[str, int], last_ms: float) -> tuple[str, str]:
        """Records the oldest unrecorded step's time (the slowest rank's, as synced; 0: none arrived) and chooses
        this step's (label, reason); the step runs as that label unless `refused` says otherwise."""
        if self.asks and last_ms:
            self.record(*self.asks.popleft(), last_ms)
        label, why = self.choose(shape)
        self.asks.append((shape, label, label))
        return label, why

    def refused(self) -> None:
        """The mode this step asked for cannot run (DBO, where a rank cannot split its batch): it runs unsplit."""
        shape, asked, _ = self.asks[-1]
        self.asks[-1] = (shape, asked, "off")

    def choose(self, shape: tuple[str, int]) -> tuple[str, str]:
        """(label, reason) for a step of this shape: a trial while the shape is measured, else the kept mode."""
        state = self.shapes.setdefault(shape, _Shape(list(self.candidates)))
        trial = state.next_trial()
        if trial is not None:
            return trial, "auto_trial"
        return state.kept or "off", "auto_fastest"

    def record(self, shape: tuple[str, int], asked: str, ran: str, ms: float) -> None:
        """The step of `shape` that asked for mode `asked` ran as `ran` and took ms (the slowest rank's)."""
        self.digest = zlib.crc32(repr((shape, asked, ran, ms)).encode(), self.digest)
        state = self.shapes[shape]
        if ran != asked and asked in state.candidates:
            state.refused[asked] = state.refused.get(asked, 0) + 1
            if state.refused[asked] >= GIVE_UP:  # e.g. DBO, when a rank's batch can never be split
                state.candidates.remove(asked)
                state.samples.pop(asked, None)
        if state.next_trial() is not None:
            if ran in state.candidates:
                state.samples.setdefault(ran, []).append(ms)
            if state.next_trial() is None:
                self._keep(shape, state)
            return
        state.steps_since += 1
        if ran == state.kept:
            state.recent.append(ms)
        drifted = len(state.recent) == RECENT and statistics.median(state.recent) > DRIFT * state.kept_ms
        if drifted or state.steps_since >= RECHECK_STEPS:
            state.samples, state.refused, state.steps_since = {}, {}, 0
            state.candidates = list(self.candidates)
            state.recent.clear()

    def _keep(self, shape: tuple[str, int], state: _Shape) -> None:
        medians = {c: statistics.median(state.samples[c][1:]) for c in state.candidates}  # the first is warm-up
        best = min(medians, key=medians.__getitem__)
        if best != "off" and medians[best] > (1 - MARGIN) * medians["off"]:
            best = "off"
        if best != state.kept:
            times = ", ".join(f"{c} {ms:.2f} ms" for c, ms in sorted(medians.items(), key=lambda kv: kv[1]))
            logger.info("overlap auto: %s steps of up to %d tokens now run %s (%s)", *shape, best, times)
        state.kept, state.kept_ms = best, medians[best]


class StepTimer:
    """How long the steps run (the tuner's input, and the engine's step statistics): CUDA events around the model
    on GPU, read once the step has finished (its sampled tokens were read), the host clock on CPU. Steps finish
    in the order they were timed, one call of the engine later under asynchronous scheduling.

    TWINBATCH_AUTO_COSTS (fault-injection tests) replaces what the tuner sees: "off=10,dbo=4,sbo2=20" gives each
    mode's step a cost in ms; parts separated by "|" are the costs of DP rank 0, 1, ... (one part: every rank's).
    """

    def __init__(self, device: torch.device, rank: int) -> None:
        self.device = device
        self.costs = _parse_costs(os.environ.get("TWINBATCH_AUTO_COSTS"), rank)
        self.running: deque[tuple[str, int, tuple[torch.cuda.Event, torch.cuda.Event] | None]] = deque()
        self.done: deque[tuple[str, int]] = deque()  # (label, us) of finished steps the tuner has not taken

    @contextlib.contextmanager
    def timing(self, label: str) -> Iterator[None]:
        """Times the step run inside the block, as mode `label`."""
        start, events = time.perf_counter(), None
        if self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        yield
        if events is not None:
            events[1].record()
        self.running.append((label, int(1e6 * (time.perf_counter() - start)), events))

    def finished(self) -> int:
        """The oldest timed step has finished: -> its microseconds, queued for the tuner."""
        label, us, events = self.running.popleft()
        if events is not None:
            events[1].synchronize()  # done already: the step's tokens were read
            us = int(1e3 * events[0].elapsed_time(events[1]))
        self.done.append((label, max(1, us)))
        return max(1, us)

    def report_us(self) -> int:
        """The oldest finished step's time the tuner has not taken (0: none), with the injected costs."""
        if not self.done:
            return 0
        label, us = self.done[0]
        return int(1e3 * self.costs[label]) if label in self.costs else us

    def taken(self) -> None:
        """A step was planned, so the tuner took report_us's time: the next finished step's comes next."""
        if self.done:
            self.done.popleft()


def _parse_costs(spec: str | None, rank: int) -> dict[str, float]:
    if not spec:
        return {}
    parts = spec.split("|")
    part = parts[rank] if len(parts) > 1 else parts[0]
    try:
        return {mode: float(ms) for mode, ms in (item.split("=") for item in part.split(",") if item)}
    except ValueError:
        raise ValueError(
            f"TWINBATCH_AUTO_COSTS={spec!r}: use mode=ms[,mode=ms...][|...] (one part a DP rank)"
        ) from None
