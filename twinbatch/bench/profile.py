"""`bench step --profile`: a Perfetto trace and a kernel table of one step."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from pathlib import Path

import torch


def profile_step(fn: Callable[[], object], directory: str, name: str, echo: bool) -> None:
    """A torch.profiler trace of one step (fn) for Perfetto, DIR/NAME.json, and its kernel table, DIR/NAME.txt
    (printed too where echo). One untraced run first, so capture and compilation stay out of the trace."""
    fn()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    try:  # the microbatch threads' operators too, not only this thread's
        config = {"experimental_config": torch.profiler._ExperimentalConfig(profile_all_threads=True)}
    except TypeError:  # a torch without the option: GPU kernels are still traced from every thread
        config = {}
    with torch.profiler.profile(activities=activities, **config) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    Path(directory).mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(Path(directory) / f"{name}.json"))
    table = f"{name}: {kernel_table(prof)}"
    (Path(directory) / f"{name}.txt").write_text(table + "\n")
    if echo:
        print(table, flush=True)


def kernel_table(prof: torch.profiler.profile, top: int = 25) -> str:
    """GPU kernels by total time (also those a CUDA graph replays, which have no CPU op above them); on CPU,
    the operators by self time."""
    on_gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not on_gpu:
        return "CPU operators\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    by_name: dict[str, list[float]] = {}
    for e in on_gpu:
        count_us = by_name.setdefault(e.name, [0, 0.0])
        count_us[0] += 1
        count_us[1] += e.device_time
    total = sum(us for _, us in by_name.values())
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in on_gpu]
    lines = [f"{len(on_gpu)} GPU kernels and copies, {total / 1e3:.2f} ms of GPU time", overlap_summary(kernels),
             f"{'ms':>8} {'share':>6} {'calls':>6} {'us/call':>8}  kernel"]  # fmt: skip
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{us / 1e3:8.3f} {us / total:6.1%} {n:6d} {us / n:8.1f}  {name[:100]}")
    return "\n".join(lines)


def overlap_summary(kernels: list[tuple[str, float, float]]) -> str:
    """kernels: (name, start us, end us) of one step's GPU work -> the step's span, how long some compute kernel
    ran (their union) and how long none did, and how much of the collectives' (NCCL's) time ran beside compute.
    A DBO step slower than its ideal although compute is busy nearly all its span lost the time to compute
    kernels slowed beside the collectives, not to waiting for them (docs/dbo.md, SMs for the collectives)."""
    comm = [(start, end) for name, start, end in kernels if "nccl" in name.lower()]
    busy: list[list[float]] = []  # the compute kernels' union, sorted, disjoint
    for start, end in sorted((start, end) for name, start, end in kernels if "nccl" not in name.lower()):
        if busy and start <= busy[-1][1]:
            busy[-1][1] = max(busy[-1][1], end)
        else:
            busy.append([start, end])
    span = max(end for _, _, end in kernels) - min(start for _, start, _ in kernels)
    compute = sum(end - start for start, end in busy)
    starts = [start for start, _ in busy]

    def beside_compute(start: float, end: float) -> float:
        first = max(bisect.bisect_right(starts, start) - 1, 0)
        last = bisect.bisect_left(starts, end)
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy[first:last])

    beside = sum(beside_compute(start, end) for start, end in comm)
    comm_us = sum(end - start for start, end in comm)
    return (f"span {_ms(span)}: compute kernels running {_ms(compute)}, none {_ms(span - compute)}; collectives "
            f"{_ms(comm_us)}, {_ms(beside)} of it beside compute")  # fmt: skip


def _ms(us: float) -> str:
    return f"{us / 1e3:.2f} ms"
