"""`bench step --profile`: a Perfetto trace and a kernel table of one step."""

from __future__ import annotations

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
    lines = [f"{len(on_gpu)} GPU kernels and copies, {total / 1e3:.2f} ms of GPU time",
             f"{'ms':>8} {'share':>6} {'calls':>6} {'us/call':>8}  kernel"]  # fmt: skip
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{us / 1e3:8.3f} {us / total:6.1%} {n:6d} {us / n:8.1f}  {name[:100]}")
    return "\n".join(lines)
