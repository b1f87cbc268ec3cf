"""Prometheus metrics under vLLM's names, so vLLM dashboards work unchanged; twinbatch-only ones (DBO) use the
`twinbatch:` prefix. Every series carries `model_name` and `engine` (the DP rank), as in vLLM.

Engine state comes from each DP rank's latest get_stats(), read at scrape time. Latencies are measured here, on
the event loop, as outputs arrive; a request's queue, prefill and decode times come with its last output, measured
by the engine that ran it. Aborted requests are counted by the engines, which are the ones that abort them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from twinbatch.config import EngineConfig
from twinbatch.outputs import RequestOutput

# vLLM's buckets
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0]  # fmt: skip
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
N_BUCKETS = [1, 2, 5, 10, 20]
LABELS = ["model_name", "engine"]


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(m * scale)
        scale *= 10


# get_stats() key -> the per-engine series it feeds
ENGINE_SERIES = {
    "num_running": ("vllm:num_requests_running", GaugeMetricFamily, "Requests in model execution batches."),
    "num_waiting": ("vllm:num_requests_waiting", GaugeMetricFamily, "Requests waiting to be processed."),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", GaugeMetricFamily, "KV-cache usage. 1 means 100 percent usage."),
    "num_prompt_tokens": ("vllm:prompt_tokens", CounterMetricFamily, "Prefill tokens processed."),
    "num_generation_tokens": ("vllm:generation_tokens", CounterMetricFamily, "Generation tokens processed."),
    "num_preemptions": ("vllm:num_preemptions", CounterMetricFamily, "Cumulative number of preemptions."),
}


class EngineStatsCollector(Collector):
    """Per-rank gauges and counters from LLMEngine.get_stats(), as last reported, and the finished-request
    counter: finish reasons counted here, aborts counted by the engines."""

    def __init__(self, model_name: str, config: EngineConfig, get_stats: Callable[[], dict[int, dict]]) -> None:
        self.model_name, self.config, self.get_stats = model_name, config, get_stats
        self.finished: Counter[tuple[str, str]] = Counter()  # (engine, finish reason) -> requests

    def collect(self) -> Iterator[Metric]:
        ranks = [([self.model_name, str(rank)], stats) for rank, stats in sorted(self.get_stats().items())]
        for key, (name, kind, doc) in ENGINE_SERIES.items():
            family = kind(name, doc, labels=LABELS)
            for labels, stats in ranks:
                family.add_metric(labels, stats[key])
            yield family
        yield from (self._dbo(ranks), self._overlap(ranks), self._cache_info(ranks), self._success(ranks))
        yield from self._steps(ranks)

    @staticmethod
    def _steps(ranks: list[tuple[list[str], dict]]) -> Iterator[Metric]:
        """The engine's step time, and the part of it the host spent outside the model's device work (compare
        with `bench step` figures of the same batch: the host part is what serving adds)."""
        steps = HistogramMetricFamily("twinbatch:engine_step_seconds", "Wall time of the engine steps that ran "
                                      "the model.", labels=LABELS)  # fmt: skip
        doc = "Part of the steps' wall time outside the model's device work: scheduling, inputs, outputs."
        host = CounterMetricFamily("twinbatch:engine_step_host_seconds", doc, labels=LABELS)
        for labels, stats in ranks:
            times = stats["step_seconds"]
            buckets = [(str(le), n) for le, n in times["buckets"]] + [("+Inf", times["count"])]
            steps.add_metric(labels, buckets, times["sum"])
            host.add_metric(labels, times["host_sum"])
        yield from (steps, host)

    @staticmethod
    def _dbo(ranks: list[tuple[list[str], dict]]) -> Metric:
        family = CounterMetricFamily("twinbatch:dbo_steps", "Steps by dual-batch-overlap outcome: microbatched, "
                                     "or why not.", labels=[*LABELS, "reason"])  # fmt: skip
        for labels, stats in ranks:
            for reason, steps in sorted(stats["dbo"].items()):
                family.add_metric([*labels, reason], steps)
        return family

    @staticmethod
    def _overlap(ranks: list[tuple[list[str], dict]]) -> Metric:
        family = CounterMetricFamily("twinbatch:overlap_steps", "Steps by overlap mode (off, dbo, sbo<rounds>) and "
                                     "the reason it was chosen.", labels=[*LABELS, "mode", "reason"])  # fmt: skip
        for labels, stats in ranks:
            for mode, reasons in stats["overlap"].items():
                for reason, steps in reasons.items():
                    family.add_metric([*labels, mode, reason], steps)
        return family

    def _cache_info(self, ranks: list[tuple[list[str], dict]]) -> Metric:
        family = GaugeMetricFamily("vllm:cache_config_info", "Information of the KV cache configuration.",
                                   labels=[*LABELS, "block_size", "num_gpu_blocks", "cache_dtype"])  # fmt: skip
        cache = self.config.cache
        for labels, _ in ranks:
            dtype = str(self.config.dtype).removeprefix("torch.")
            family.add_metric([*labels, str(cache.block_size), str(cache.num_blocks), dtype], 1)
        return family

    def _success(self, ranks: list[tuple[list[str], dict]]) -> Metric:
        family = CounterMetricFamily("vllm:request_success", "Finished requests.", labels=[*LABELS, "finished_reason"])
        for labels, stats in ranks:
            family.add_metric([*labels, "abort"], stats["num_aborted"])
        for (engine, reason), n in sorted(self.finished.items()):
            family.add_metric([self.model_name, engine, reason], n)
        return family


@dataclass
class RequestTimes:
    arrival: float
    max_tokens: int | None
    first_of_n: int  # n for the first sample of a prompt (it counts the prompt's n once), else 0
    last_token: float | None = None
    num_tokens: int = 0


class ServerMetrics:
    def __init__(self, model_name: str, config: EngineConfig, get_stats: Callable[[], dict[int, dict]]) -> None:
        self.registry = CollectorRegistry()
        self.engines = EngineStatsCollector(model_name, config, get_stats)
        self.registry.register(self.engines)
        self.model_name = model_name
        max_len = config.scheduler.max_model_len

        def histogram(name: str, doc: str, buckets: list) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Time per output token.", ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", REQUEST_LATENCY_BUCKETS)
        self.phases = {
            phase: histogram(f"vllm:request_{phase}_seconds", f"Request {phase.replace('_', ' ')}.",
                             REQUEST_LATENCY_BUCKETS)
            for phase in ("queue_time", "prefill_time", "decode_time", "inference_time")
        }  # fmt: skip
        tokens = buckets_1_2_5(max_len)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens of a request.", tokens)
        self.generation_tokens = histogram("vllm:request_generation_tokens", "Tokens a request generated.", tokens)
        self.max_tokens = histogram("vllm:request_params_max_tokens", "The max_tokens request parameter.", tokens)
        self.n = histogram("vllm:request_params_n", "The n request parameter.", N_BUCKETS)
        self.requests: dict[str, RequestTimes] = {}

    def arrived(self, request_id: str, max_tokens: int | None, first_of_n: int) -> None:
        self.requests[request_id] = RequestTimes(time.monotonic(), max_tokens, first_of_n)

    def forget(self, request_id: str) -> None:
        """A request the server gives up on (aborted, or failed with the engine); its engine counts aborts."""
        self.requests.pop(request_id, None)

    def observe(self, out: RequestOutput) -> None:
        """Records one output of a request: its first token, the tokens since the last output, its end."""
        times = self.requests.get(out.request_id)
        if times is None:
            return
        labels = (self.model_name, str(out.engine_index))
        t, num_tokens = time.monotonic(), len(out.outputs[0].token_ids)
        if times.last_token is None and num_tokens:
            self.ttft.labels(*labels).observe(t - times.arrival)
        elif num_tokens > times.num_tokens:
            gap = (t - times.last_token) / (num_tokens - times.num_tokens)
            for _ in range(num_tokens - times.num_tokens):
                self.itl.labels(*labels).observe(gap)
                self.tpot.labels(*labels).observe(gap)
        times.last_token, times.num_tokens = t, num_tokens
        if out.finished:
            self._finished(out, times, labels, t)

    def _finished(self, out: RequestOutput, times: RequestTimes, labels: tuple[str, str], t: float) -> None:
        del self.requests[out.request_id]
        self.engines.finished[(labels[1], out.outputs[0].finish_reason or "error")] += 1
        self.e2e.labels(*labels).observe(t - times.arrival)
        self.prompt_tokens.labels(*labels).observe(len(out.prompt_token_ids))
        self.generation_tokens.labels(*labels).observe(times.num_tokens)
        if times.max_tokens is not None:
            self.max_tokens.labels(*labels).observe(times.max_tokens)
        if times.first_of_n:
            self.n.labels(*labels).observe(times.first_of_n)
        if out.metrics is not None:
            for phase, histogram in self.phases.items():
                histogram.labels(*labels).observe(getattr(out.metrics, phase))
