"""Prometheus metrics under vLLM's names, so vLLM dashboards work unchanged; twinbatch-only ones (DBO) use the
`twinbatch:` prefix.

Engine state comes from each DP rank's latest get_stats(), read at scrape time and labelled engine="<rank>" as
in vLLM. Latencies are measured here, on the event loop, as outputs arrive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from twinbatch.outputs import RequestOutput

# vLLM's buckets
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0]  # fmt: skip
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]  # fmt: skip


class EngineStatsCollector(Collector):
    """Per-rank gauges and counters from LLMEngine.get_stats(), as last reported."""

    def __init__(self, model_name: str, get_stats: Callable[[], dict[int, dict]]) -> None:
        self.model_name, self.get_stats = model_name, get_stats

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in model execution batches.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to be processed.", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", labels=labels)
        prompt = CounterMetricFamily("vllm:prompt_tokens", "Prefill tokens processed.", labels=labels)
        generation = CounterMetricFamily("vllm:generation_tokens", "Generation tokens processed.", labels=labels)
        dbo = CounterMetricFamily(
            "twinbatch:dbo_steps", "Steps by dual-batch-overlap outcome: microbatched, or why not.",
            labels=[*labels, "reason"],
        )  # fmt: skip
        for rank, stats in sorted(self.get_stats().items()):
            values = [self.model_name, str(rank)]
            running.add_metric(values, stats["num_running"])
            waiting.add_metric(values, stats["num_waiting"])
            kv.add_metric(values, stats["kv_cache_usage"])
            prompt.add_metric(values, stats["num_prompt_tokens"])
            generation.add_metric(values, stats["num_generation_tokens"])
            for reason, steps in sorted(stats["dbo"].items()):
                dbo.add_metric([*values, reason], steps)
        yield from (running, waiting, kv, prompt, generation, dbo)


@dataclass
class RequestTimes:
    arrival: float
    last_token: float | None = None
    num_tokens: int = 0


class ServerMetrics:
    def __init__(self, model_name: str, get_stats: Callable[[], dict[int, dict]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineStatsCollector(model_name, get_stats))
        labels, r = {"labelnames": ["model_name"], "registry": self.registry}, self.registry
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS, **labels
        )
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Inter-token latency.", buckets=ITL_BUCKETS, **labels)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", buckets=E2E_BUCKETS, **labels
        )
        self.success = Counter(
            "vllm:request_success", "Finished requests.", ["model_name", "finished_reason"], registry=r
        )
        self.model_name = model_name
        self.requests: dict[str, RequestTimes] = {}

    def arrived(self, request_id: str) -> None:
        self.requests[request_id] = RequestTimes(time.monotonic())

    def forget(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def observe(self, out: RequestOutput) -> None:
        """Records one output of a request: its first token, the tokens since the last output, its end."""
        times = self.requests.get(out.request_id)
        if times is None:
            return
        t, num_tokens = time.monotonic(), len(out.outputs[0].token_ids)
        if times.last_token is None:
            self.ttft.labels(self.model_name).observe(t - times.arrival)
        elif num_tokens > times.num_tokens:
            gap = (t - times.last_token) / (num_tokens - times.num_tokens)
            for _ in range(num_tokens - times.num_tokens):
                self.itl.labels(self.model_name).observe(gap)
        times.last_token, times.num_tokens = t, num_tokens
        if out.finished:
            self.e2e.labels(self.model_name).observe(t - times.arrival)
            self.success.labels(self.model_name, out.outputs[0].finish_reason).inc()
            del self.requests[out.request_id]
