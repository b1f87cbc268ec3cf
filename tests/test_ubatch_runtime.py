"""The DBO thread ring driven by plain Python work: exact interleaving, one microbatch at a time, persistent
threads, and failures that end the step with a DBOStepError naming where it stopped, never a hang."""

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from twinbatch.worker.ubatch.runtime import DBOStepError, UBatchContext, UBatchRuntime

Work = Callable[[UBatchContext], None]
Log = list[tuple[int, str]]
STEPS = [f"{layer}{half}" for layer in range(3) for half in "ab"] + ["end"]
LABELS = ["dispatch", "combine"]


@pytest.fixture
def make_runtime() -> Iterator[Callable[[int], UBatchRuntime]]:
    runtimes: list[UBatchRuntime] = []

    def make(n: int) -> UBatchRuntime:
        runtimes.append(UBatchRuntime(n))
        return runtimes[-1]

    yield make
    for r in runtimes:
        r.close()


def layered(
    log: Log, num_yields: int = 6, fail_after: int | None = None, segment: Callable[[], None] = lambda: None
) -> Work:
    """A forward of num_yields / 2 layers: compute, dispatch yield, compute, combine yield; logs each segment."""

    def work(ctx: UBatchContext) -> None:
        yields = [ctx.yield_and_switch_from_compute_to_comm, ctx.yield_and_switch_from_comm_to_compute]
        for k in range(num_yields + 1):
            if k == fail_after:
                raise ValueError("boom")
            log.append((ctx.index, STEPS[k] if k < num_yields else "end"))
            segment()
            if k < num_yields:
                yields[k % 2]()

    return work


def expected(n: int, num_yields: int = 6) -> tuple[Log, Log]:
    log = [(u, step) for step in [*STEPS[:num_yields], "end"] for u in range(n)]
    return log, [(u, LABELS[k % 2]) for k in range(num_yields) for u in range(n)]


def run_normal(rt: UBatchRuntime) -> None:
    log: Log = []
    trace = rt.run([layered(log) for _ in range(rt.n)])
    assert (log, trace) == expected(rt.n)


def run_failing(rt: UBatchRuntime, work: list[Work], match: str) -> None:
    start = time.monotonic()
    with pytest.raises(DBOStepError, match=match):
        rt.run(work)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("n", [2, 3])
def test_round_robin_at_every_yield(make_runtime: Callable[[int], UBatchRuntime], n: int) -> None:
    rt = make_runtime(n)
    run_normal(rt)
    run_normal(rt)


@pytest.mark.parametrize("n", [2, 3])
def test_one_at_a_time_on_persistent_threads(make_runtime: Callable[[int], UBatchRuntime], n: int) -> None:
    rt, active, peak = make_runtime(n), [0], [0]
    idents: list[dict[int, int]] = []

    def segment() -> None:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.001)
        active[0] -= 1

    def ident(work: Work) -> Work:
        def wrapped(ctx: UBatchContext) -> None:
            idents[-1][ctx.index] = threading.get_ident()
            work(ctx)

        return wrapped

    for _ in range(4):
        idents.append({})
        rt.run([ident(layered([], segment=segment)) for _ in range(n)])
    assert peak[0] == 1
    assert all(i == idents[0] for i in idents) and len({*idents[0].values(), threading.get_ident()}) == n + 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("n", "bad", "fail_after", "where"),
    [
        (2, 1, 2, "after yield 2 \\(combine\\)"),
        (2, 1, 3, "after yield 3 \\(dispatch\\)"),
        (2, 0, 0, "before its first yield"),
        (2, 0, 6, "after yield 6 \\(combine\\)"),
        (3, 2, 1, "after yield 1 \\(dispatch\\)"),
        (3, 1, 4, "after yield 4 \\(combine\\)"),
    ],
)
def test_failing_ubatch_names_where_it_stopped(
    make_runtime: Callable[[int], UBatchRuntime], n: int, bad: int, fail_after: int, where: str
) -> None:
    rt = make_runtime(n)
    work = [layered([], fail_after=fail_after if u == bad else None) for u in range(n)]
    run_failing(rt, work, f"microbatch {bad} failed {where}: ValueError: boom")
    run_normal(rt)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("counts", [(3, 4), (4, 3), (2, 2, 3), (4, 4, 3), (0, 2)])
def test_yield_counts_differ(make_runtime: Callable[[int], UBatchRuntime], counts: tuple[int, ...]) -> None:
    rt = make_runtime(len(counts))
    run_failing(rt, [layered([], num_yields=c) for c in counts], "yield counts differ")
    run_normal(rt)


@pytest.mark.timeout(20)
def test_injected_fault(make_runtime: Callable[[int], UBatchRuntime], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINBATCH_DBO_FAULT", "1:2")
    rt = make_runtime(2)
    run_failing(rt, [layered([]) for _ in range(2)], "microbatch 1 failed after yield 2 .*injected fault")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("n", [2, 3])
def test_every_step_starts_at_ubatch_0(make_runtime: Callable[[int], UBatchRuntime], n: int) -> None:
    rt = make_runtime(n)
    for i in range(30):
        if i % 3 == 1:
            run_failing(rt, [layered([], fail_after=i % 7 if u == i % n else None) for u in range(n)], "boom")
        elif i % 3 == 2:
            run_failing(rt, [layered([], num_yields=2 + (u == i % n)) for u in range(n)], "yield counts")
        else:
            run_normal(rt)


class LateEvent(threading.Event):
    """A legal schedule: woken microbatch threads resume late (microbatch 0 latest), the main thread clears late."""

    def wait(self, timeout: float | None = None) -> bool:
        woke = super().wait(timeout)
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.05 if threading.current_thread().name == "ubatch-0" else 0.01)
        return woke

    def clear(self) -> None:
        if threading.current_thread() is threading.main_thread():
            time.sleep(0.05)
        super().clear()


@pytest.mark.timeout(20)
def test_step_after_failure_with_late_wakeups(
    make_runtime: Callable[[int], UBatchRuntime], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("twinbatch.worker.ubatch.runtime.TIMEOUT_S", 0.25)
    with monkeypatch.context() as m:
        m.setattr(threading, "Event", LateEvent)
        rt = make_runtime(2)
    run_failing(rt, [layered([], fail_after=0), layered([])], "microbatch 0 failed before its first yield")
    run_normal(rt)


def test_comm_sms_reserved_sets_and_restores_the_matmul_carveout() -> None:
    """The reservation is process state that a GPU step's persistent matmuls read (settable without a GPU): set
    inside the block, restored after it, also when the step raises; none for 0 SMs or on CPU."""
    import torch

    from twinbatch.worker.ubatch.ubatched_forward import comm_sms_reserved

    def state() -> tuple[object, object]:
        return torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()

    before = state()
    with pytest.raises(RuntimeError, match="microbatch failed"), comm_sms_reserved(torch.device("cuda"), 8):
        assert state() == (8, torch._C._BlasBackend.Cublaslt)  # cuBLAS honours the carveout only through Lt
        raise RuntimeError("microbatch failed")
    assert state() == before
    with comm_sms_reserved(torch.device("cuda"), 0), comm_sms_reserved(torch.device("cpu"), 8):
        assert state() == before


def test_dbo_comm_sms_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from twinbatch.worker.ubatch.ubatched_forward import dbo_comm_sms

    cpu = torch.device("cpu")
    monkeypatch.delenv("TWINBATCH_DBO_COMM_SMS", raising=False)
    assert dbo_comm_sms(cpu) == 8
    monkeypatch.setenv("TWINBATCH_DBO_COMM_SMS", "0")
    assert dbo_comm_sms(cpu) == 0
    for bad in ("-1", "eight", "4.5"):
        monkeypatch.setenv("TWINBATCH_DBO_COMM_SMS", bad)
        with pytest.raises(ValueError, match=r"TWINBATCH_DBO_COMM_SMS='.*': set it to a whole number of SMs"):
            dbo_comm_sms(cpu)
