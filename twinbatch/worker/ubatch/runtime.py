"""The dual-batch-overlap runtime: one persistent thread per microbatch, exactly one running at a time.

A ring of CPU events passes the baton: microbatch i runs until it launches a collective, then yields to the next
one (which computes while the collective is in flight) and waits for the baton to come back. Every microbatch
must make the same sequence of yields. If one raises, or the yield counts differ, every thread unwinds and the
step raises DBOStepError naming the microbatch and where it stopped: never a hang.

On GPU all microbatches issue compute on the same (current) stream; collectives run on NCCL's communication
stream and waiting on them orders the compute stream with a CUDA event, so a yield never blocks the device.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from twinbatch.compilation import opaque
from twinbatch.distributed.parallel_state import TIMEOUT_S


class DBOStepError(RuntimeError):
    """A microbatched step failed; the message names the microbatch and where it stopped."""


class _Aborted(Exception):
    """Raised inside a microbatch thread woken because another one failed."""


@dataclass
class _StepState:
    """One step's bookkeeping. A thread keeps the state of the step it runs, so a thread still unwinding from a
    failed step can only ever touch that step, never the next."""

    yields: list[int]
    where: list[str]
    started: list[bool]
    finished: list[bool]
    running: int = 0
    trace: list[tuple[int, str]] = field(default_factory=list)  # (microbatch, yield label), in order
    error: DBOStepError | None = None

    @staticmethod
    def new(n: int) -> _StepState:
        return _StepState([0] * n, [""] * n, [False] * n, [False] * n)


class UBatchContext:
    """What one microbatch's code calls to hand the CPU over; explicit per microbatch and per step."""

    def __init__(self, runtime: UBatchRuntime, index: int, state: _StepState) -> None:
        self.runtime, self.index, self.state = runtime, index, state

    @opaque
    def yield_and_switch_from_compute_to_comm(self, label: str = "dispatch") -> None:
        """After launching a dispatch: let the next microbatch compute while this one's tokens travel."""
        self.runtime.yield_from(self, label)

    @opaque
    def yield_and_switch_from_comm_to_compute(self, label: str = "combine") -> None:
        """After launching a combine: let the next microbatch compute while this one's results travel back."""
        self.runtime.yield_from(self, label)


class UBatchRuntime:
    def __init__(self, num_ubatches: int) -> None:
        self.n = num_ubatches
        self.turn = [threading.Event() for _ in range(num_ubatches)]  # the ring: microbatch i may run
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.idle = threading.Condition()  # counts threads parked between steps
        self.num_idle = 0
        self.work: list[Callable[[UBatchContext], None]] = []
        self.state = _StepState.new(num_ubatches)
        self.fault = _parse_fault(os.environ.get("TWINBATCH_DBO_FAULT"))
        self.closed = False
        self.threads = [
            threading.Thread(target=self._thread_main, args=(i,), name=f"ubatch-{i}", daemon=True)
            for i in range(num_ubatches)
        ]
        for t in self.threads:
            t.start()

    def run(self, work: list[Callable[[UBatchContext], None]]) -> list[tuple[int, str]]:
        """Runs one step: work[i] is microbatch i's forward. Returns the yield trace; raises DBOStepError."""
        assert len(work) == self.n
        with self.idle:  # after a failed step, every thread must have unwound before the next one starts
            if not self.idle.wait_for(lambda: self.num_idle == self.n, TIMEOUT_S):
                raise DBOStepError(f"a microbatch thread is still stuck in an earlier failed step ({self._where()})")
        self.work = work
        self.state = state = _StepState.new(self.n)
        for event in self.turn:  # a baton left set by the last step's final hand-over would start a thread early
            event.clear()
        self.done.clear()
        self.turn[0].set()
        if not self.done.wait(2 * TIMEOUT_S):
            self._abort(state, DBOStepError(f"microbatched step made no progress for {2 * TIMEOUT_S} s: "
                                            f"{self._where()}"))  # fmt: skip
        self.work = []  # the step's closures hold its tensors (under capture, a graph's memory): let them go
        if state.error is not None:
            raise state.error
        return state.trace

    def yield_from(self, ctx: UBatchContext, label: str) -> None:
        i, st = ctx.index, ctx.state
        st.yields[i] += 1
        st.where[i] = label
        st.trace.append((i, label))
        if self.fault == (i, st.yields[i]):
            raise RuntimeError(f"injected fault (TWINBATCH_DBO_FAULT) at yield {st.yields[i]}")
        nxt = self._next_unfinished(st, i)
        if nxt is None:
            raise DBOStepError(
                f"microbatch {i} made yield {st.yields[i]} ({label}) after every other microbatch finished: "
                f"yield counts differ ({self._where()})"
            )
        self._pass_baton(st, i, nxt)
        self._wait_turn(st, i)

    def _thread_main(self, i: int) -> None:
        while True:
            with self.idle:
                self.num_idle += 1
                self.idle.notify_all()
            self.turn[i].wait()
            with self.idle:
                self.num_idle -= 1
            if self.closed:
                return
            state = self.state
            try:
                self._wait_turn(state, i)
                state.started[i] = True
                self.work[i](UBatchContext(self, i, state))
                self._finish(state, i)
            except _Aborted:
                pass
            except BaseException as e:  # any failure must end the step, not hang it
                self._abort(state, self._describe(state, i, e), failed=i)

    def _finish(self, st: _StepState, i: int) -> None:
        if st.error is not None:  # the step already failed (e.g. timed out) while this thread still worked
            raise _Aborted
        st.finished[i] = True
        done_counts = {st.yields[j] for j in range(self.n) if st.finished[j]}
        if len(done_counts) > 1:
            raise DBOStepError(f"microbatch {i} finished after {st.yields[i]} yields: yield counts differ "
                               f"({self._where()})")  # fmt: skip
        nxt = self._next_unfinished(st, i)
        if nxt is None:
            self.done.set()
        else:
            self._pass_baton(st, i, nxt)

    def _next_unfinished(self, st: _StepState, i: int) -> int | None:
        for k in range(1, self.n):
            j = (i + k) % self.n
            if not st.finished[j]:
                return j
        return None

    def _pass_baton(self, st: _StepState, i: int, j: int) -> None:
        with self.lock:
            if st.error is not None:
                raise _Aborted
            assert st.running == i, f"microbatch {i} passed a baton held by {st.running}"
            st.running = j
            self.turn[j].set()

    def _wait_turn(self, st: _StepState, i: int) -> None:
        self.turn[i].wait()
        self.turn[i].clear()
        if st.error is not None or self.closed:
            raise _Aborted
        with self.lock:
            assert st.running == i, f"microbatch {i} woke while {st.running} runs"

    def _describe(self, st: _StepState, i: int, e: BaseException) -> DBOStepError:
        if isinstance(e, DBOStepError):
            return e
        where = f"after yield {st.yields[i]} ({st.where[i]})" if st.yields[i] else "before its first yield"
        err = DBOStepError(f"microbatch {i} failed {where}: {type(e).__name__}: {e}")
        err.__cause__ = e
        return err

    def _abort(self, st: _StepState, error: DBOStepError, failed: int | None = None) -> None:
        """Ends the step: wakes the threads waiting inside it (not those parked for a later turn), which unwind."""
        with self.lock:
            if st.error is not None:
                return
            st.error = error
            for j in range(self.n):
                if st.started[j] and not st.finished[j] and j != failed:
                    self.turn[j].set()
        self.done.set()

    def _where(self) -> str:
        st = self.state
        return ", ".join(f"microbatch {i}: {st.yields[i]} yields, last at {st.where[i] or '-'}" for i in range(self.n))

    def close(self) -> None:
        """Ends the threads (those parked between steps return at once)."""
        self.closed = True
        for event in self.turn:
            event.set()
        for t in self.threads:
            t.join(timeout=1.0)


def _parse_fault(spec: str | None) -> tuple[int, int] | None:
    """TWINBATCH_DBO_FAULT="U:K" makes microbatch U raise at its K-th yield (fault-injection tests)."""
    if not spec:
        return None
    ubatch, k = spec.split(":")
    return int(ubatch), int(k)
