"""The arithmetic of `twinbatch bench serve`, as pure functions of chunk arrival times (definitions as vLLM's).

- TTFT: from sending a request to the first streamed chunk whose `choices` is non-empty.
- ITL: the gaps between successive chunks with non-empty `choices` (a chunk may carry several tokens).
- E2EL: from sending to the last chunk with non-empty `choices` (the trailing usage chunk does not count).
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request, only for requests of more than one output token.
- Output tokens: `usage.completion_tokens` when the server sends usage, else the number of content chunks.
- Throughputs: completed requests, output tokens, input + output tokens, each over the benchmark's duration.
- Retries: requests resent once because their first connection failed before a status line (serve_client.py).
- Client CPU time: the benchmark process's CPU time over the run; near the duration, the client was the bottleneck.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

METRICS = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}  # fmt: skip


@dataclass
class RequestFuncOutput:
    """One request as the client saw it; times in seconds (time.perf_counter)."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2EL
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""
    retries: int = 0


def parse_stream(start: float, events: list[tuple[float, dict[str, Any]]], prompt_len: int) -> RequestFuncOutput:
    """Times one streamed completion from its decoded `data:` chunks, each with its arrival time."""
    out = RequestFuncOutput(prompt_len=prompt_len, start_time=start)
    content_times: list[float] = []
    completion_tokens = None
    for t, data in events:
        if "error" in data:
            out.error = str(data["error"])
            return out
        if choices := data.get("choices"):
            content_times.append(t)
            out.generated_text += choices[0].get("text") or ""
        if usage := data.get("usage"):  # the last one wins: servers that repeat usage send running totals
            completion_tokens = usage.get("completion_tokens", completion_tokens)
            out.prompt_len = usage.get("prompt_tokens") or out.prompt_len
    if not content_times:
        out.error = "no chunk with choices: the first token cannot be timed"
        return out
    out.ttft = content_times[0] - start
    out.itl = [b - a for a, b in itertools.pairwise(content_times)]
    out.latency = content_times[-1] - start
    out.output_tokens = completion_tokens if completion_tokens is not None else len(content_times)
    out.success = True
    return out


def request_tpot(out: RequestFuncOutput) -> float | None:
    """Mean time per output token after the first; None where there is no second token."""
    if out.output_tokens <= 1:
        return None
    return (out.latency - out.ttft) / (out.output_tokens - 1)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100), interpolating linearly between closest ranks (numpy's default method)."""
    if not values:
        return 0.0
    s = sorted(values)
    h = (len(s) - 1) * p / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (h - lo) * (s[hi] - s[lo])


def percentile_name(p: float) -> str:
    return f"p{int(p)}" if p == int(p) else f"p{p}"


def summarize(values: list[float], percentiles: list[float]) -> dict[str, float]:
    """mean / median / std (population) / percentiles, in milliseconds; zeros for no values (as vLLM)."""
    ms = [1e3 * v for v in values] or [0.0]
    stats = {"mean": statistics.fmean(ms), "median": statistics.median(ms), "std": statistics.pstdev(ms)}
    return stats | {percentile_name(p): percentile(ms, p) for p in percentiles}


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    retries: int
    duration: float
    client_cpu_time: float  # s of CPU (time.process_time) the client spent over `duration`
    latency_ms: dict[str, dict[str, float]]  # "ttft"/"tpot"/"itl"/"e2el" -> summarize(...)

    @property
    def client_cpu_fraction(self) -> float:
        return self.client_cpu_time / self.duration

    @property
    def request_throughput(self) -> float:
        return self.completed / self.duration

    @property
    def output_throughput(self) -> float:
        return self.total_output / self.duration

    @property
    def total_token_throughput(self) -> float:
        return (self.total_input + self.total_output) / self.duration


def calculate_metrics(
    outputs: list[RequestFuncOutput], duration: float, client_cpu_time: float, percentiles: list[float]
) -> BenchmarkMetrics:
    ok = [o for o in outputs if o.success]
    series = {
        "ttft": [o.ttft for o in ok],
        "tpot": [t for o in ok if (t := request_tpot(o)) is not None],
        "itl": [gap for o in ok for gap in o.itl],
        "e2el": [o.latency for o in ok],
    }
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        retries=sum(o.retries for o in outputs),
        total_input=sum(o.prompt_len for o in ok),
        total_output=sum(o.output_tokens for o in ok),
        duration=duration,
        client_cpu_time=client_cpu_time,
        latency_ms={name: summarize(values, percentiles) for name, values in series.items()},
    )


def format_table(m: BenchmarkMetrics, selected: list[str], max_concurrency: int | None, request_rate: float) -> str:
    """vLLM's "Serving Benchmark Result" table."""
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value: float | int) -> None:
        lines.append(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}")

    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    row("Retried requests:", m.retries)
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    if request_rate != math.inf:
        row("Request rate configured (RPS):", request_rate)
    row("Benchmark duration (s):", m.duration)
    row("Client CPU time (s):", m.client_cpu_time)
    row("Client CPU / duration (%):", 100 * m.client_cpu_fraction)
    row("Total input tokens:", m.total_input)
    row("Total generated tokens:", m.total_output)
    row("Request throughput (req/s):", m.request_throughput)
    row("Output token throughput (tok/s):", m.output_throughput)
    row("Total token throughput (tok/s):", m.total_token_throughput)
    for name in (n for n in METRICS if n in selected):
        short, header = METRICS[name]
        lines.append(f"{header:-^50}")
        for stat, value in m.latency_ms[name].items():
            if stat != "std":
                row(f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {short} (ms):", value)
    lines.append("=" * 50)
    return "\n".join(lines)


def result_json(m: BenchmarkMetrics, outputs: list[RequestFuncOutput], selected: list[str]) -> dict[str, Any]:
    """The figures under vLLM's result-file keys (mean_ttft_ms, p99_itl_ms, ...), with the per-request lists."""
    result: dict[str, Any] = {
        "duration": m.duration, "completed": m.completed, "failed": m.failed, "retries": m.retries,
        "client_cpu_time": m.client_cpu_time, "client_cpu_fraction": m.client_cpu_fraction,
        "total_input_tokens": m.total_input, "total_output_tokens": m.total_output,
        "request_throughput": m.request_throughput, "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "input_lens": [o.prompt_len for o in outputs], "output_lens": [o.output_tokens for o in outputs],
        "ttfts": [o.ttft for o in outputs], "itls": [o.itl for o in outputs], "e2els": [o.latency for o in outputs],
        "generated_texts": [o.generated_text for o in outputs], "errors": [o.error for o in outputs],
    }  # fmt: skip
    for name in (n for n in METRICS if n in selected):
        result |= {f"{stat}_{name}_ms": value for stat, value in m.latency_ms[name].items()}
    return result
