"""`twinbatch bench serve`: load an OpenAI-compatible server with random prompts; report latency and throughput.

The flags and figures are those of vLLM's `vllm bench serve` (random dataset, `openai` backend). Prompts are
lists of random token ids, so no tokenizer is needed on the client and any server that accepts token-id prompts
on /v1/completions can be measured. Every request streams (`stream_options.include_usage`) through
serve_client.py; the metric definitions are in serve_metrics.py and docs/bench_serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from twinbatch.bench.serve_client import CompletionClient
from twinbatch.bench.serve_metrics import METRICS, RequestFuncOutput, calculate_metrics, format_table
from twinbatch.bench.serve_metrics import result_json as make_result_json

DEFAULT_VOCAB_SIZE = 1000  # when neither --random-vocab-size nor the server's /tokenizer_info gives one


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="benchmark an OpenAI-compatible server (online serving latency, throughput)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server address, without /v1")
    p.add_argument("--endpoint", default="/v1/completions", help="a Completions-protocol endpoint")
    p.add_argument("--model", default=None, help="model name to send; default: the first id of GET /v1/models")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: all)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf sends all at once")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson arrivals")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 -/+ ratio)")
    p.add_argument("--random-vocab-size", type=int, default=None,
                   help="prompt ids are uniform in [0, this); default: vocab_size from GET /tokenizer_info, "
                        f"else {DEFAULT_VOCAB_SIZE}")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (a vLLM extension) with each request")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and the arrival times")
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el", help=f"subset of {','.join(METRICS)}")
    p.add_argument("--metric-percentiles", default="99", help='comma-separated, e.g. "25,50,75,99"')
    p.add_argument("--save-result", action="store_true", help="write the figures as JSON")
    p.add_argument("--result-filename", default=None, help="default: openai-{rate}qps[-concurrency{c}]-{model}-{time}")
    p.add_argument("--disable-tqdm", action="store_true")
    p.set_defaults(func=run)


@dataclass
class SampleRequest:
    prompt: list[int]
    prompt_len: int
    expected_output_len: int


def random_requests(
    n: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int, rng: random.Random
) -> list[SampleRequest]:
    """Prompts of uniform random token ids; lengths uniform in [len * (1 - ratio), len * (1 + ratio)]."""

    def length(mean: int) -> int:
        return rng.randint(max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio))))

    requests = []
    for _ in range(n):
        prompt = [rng.randrange(vocab_size) for _ in range(length(input_len))]
        requests.append(SampleRequest(prompt, len(prompt), length(output_len)))
    return requests


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times (s after the start). rate inf: all at 0. Otherwise gaps are gamma(shape=burstiness) with mean
    1/rate (exponential, i.e. Poisson arrivals, at burstiness 1; evenly spaced at burstiness inf), rescaled as in
    vLLM so that the last request goes at exactly n / rate, whatever the seed."""
    if rate == math.inf:
        return [0.0] * n
    if burstiness == math.inf:
        gaps = [1.0 / rate] * n
    else:
        gaps = [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(n)]
    times = [sum(gaps[: i + 1]) for i in range(n)]
    return [t * (n / rate) / times[-1] for t in times]


def completion_payload(args: argparse.Namespace, model: str, req: SampleRequest) -> dict[str, Any]:
    payload = {"model": model, "prompt": req.prompt, "max_tokens": req.expected_output_len,
               "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    return payload | ({"ignore_eos": True} if args.ignore_eos else {})


async def benchmark(
    args: argparse.Namespace, client: CompletionClient, model: str, requests: list[SampleRequest]
) -> tuple[list[RequestFuncOutput], float, float]:
    """Sends every request at its arrival time, at most --max-concurrency in flight; returns the outputs, the
    duration and the client's CPU time over it."""
    times = arrival_times(len(requests), args.request_rate, args.burstiness, random.Random(args.seed + 1))
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
    pbar = tqdm(total=len(requests), disable=args.disable_tqdm)
    start, cpu_start = time.perf_counter(), time.process_time()

    async def send(req: SampleRequest, at: float) -> RequestFuncOutput:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        async with limit:
            out = await client.complete(args.endpoint, completion_payload(args, model, req), req.prompt_len)
        pbar.update(1)
        return out

    outputs = await asyncio.gather(*(send(r, t) for r, t in zip(requests, times, strict=True)))
    duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    pbar.close()
    return list(outputs), duration, cpu


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Keeps the objects that exist before the run out of the garbage collector's full sweeps: with torch loaded
    one sweep stalls the event loop for 0.2-0.4 s, and the stall would be counted as latency."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def server_defaults(client: CompletionClient, args: argparse.Namespace) -> tuple[str, int]:
    """The model name (first of GET /v1/models) and the vocabulary size (GET /tokenizer_info), unless given."""
    model = args.model
    if model is None:
        try:
            model = (await client.get_json("/v1/models"))["data"][0]["id"]
        except (aiohttp.ClientError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ConnectionError(f"no model name from {client.base_url}/v1/models ({e!r}); pass --model") from e
    vocab = args.random_vocab_size
    if vocab is None:
        with contextlib.suppress(aiohttp.ClientError, ValueError, AttributeError):
            vocab = (await client.get_json("/tokenizer_info")).get("vocab_size")
    return model, int(vocab or DEFAULT_VOCAB_SIZE)


ENGINE_SERIES = ("twinbatch:engine_step_seconds_count", "twinbatch:engine_step_seconds_sum",
                 "twinbatch:engine_step_host_seconds_total")  # fmt: skip


async def engine_totals(client: CompletionClient) -> tuple[float, ...] | None:
    """The server's engine step count, step seconds and host seconds, summed over engines (DP ranks), from its
    /metrics; None where it has none (not a twinbatch server)."""
    with contextlib.suppress(aiohttp.ClientError, ValueError):
        samples = [(s.name, s.value) for f in text_string_to_metric_families(await client.get_text("/metrics"))
                   for s in f.samples]  # fmt: skip
        totals = tuple(sum(v for n, v in samples if n == name) for name in ENGINE_SERIES)
        return totals if any(n in ENGINE_SERIES for n, _ in samples) else None
    return None


def engine_steps(before: tuple[float, ...] | None, after: tuple[float, ...] | None) -> dict[str, float] | None:
    """What the engine's steps did during the run: how many, their mean time, and the host's share of it (to
    set against `bench step` figures of the same batch)."""
    if before is None or after is None or after[0] == before[0]:
        return None
    count, seconds, host = (a - b for a, b in zip(after, before, strict=True))
    return {"count": count, "mean_step_ms": 1e3 * seconds / count, "host_share": host / seconds}


async def run_async(args: argparse.Namespace) -> dict[str, Any]:
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with CompletionClient(args.base_url, args.max_concurrency, headers) as client:
        model, vocab = await server_defaults(client, args)
        rng = random.Random(args.seed)
        requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                   args.random_range_ratio, vocab, rng)  # fmt: skip
        print(f"model {model!r}; {args.num_prompts} prompts of random ids in [0, {vocab}); "
              f"request rate {args.request_rate}, burstiness {args.burstiness}, "
              f"max concurrency {args.max_concurrency}")  # fmt: skip
        before = await engine_totals(client)
        with frozen_heap():
            outputs, duration, cpu = await benchmark(args, client, model, requests)
        steps = engine_steps(before, await engine_totals(client))
    selected = args.percentile_metrics.split(",")
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    metrics = calculate_metrics(outputs, duration, cpu, percentiles)
    print(format_table(metrics, selected, args.max_concurrency, args.request_rate))
    if steps is not None:
        print(f"engine steps: {steps['count']:.0f}, mean {steps['mean_step_ms']:.2f} ms, "
              f"host share {steps['host_share']:.1%}")  # fmt: skip
    setup = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai", "base_url": args.base_url,
             "endpoint": args.endpoint, "model_id": model, "num_prompts": args.num_prompts,
             "request_rate": args.request_rate, "burstiness": args.burstiness,
             "max_concurrency": args.max_concurrency, "random_input_len": args.random_input_len,
             "random_output_len": args.random_output_len, "random_vocab_size": vocab, "ignore_eos": args.ignore_eos,
             "seed": args.seed}  # fmt: skip
    return setup | make_result_json(metrics, outputs, selected) | {"engine_steps": steps}


def run(args: argparse.Namespace) -> None:
    unknown = set(args.percentile_metrics.split(",")) - set(METRICS)
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {sorted(unknown)}; choose from {','.join(METRICS)}")
    if args.burstiness <= 0 or args.request_rate <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if args.num_prompts < 1 or (args.max_concurrency is not None and args.max_concurrency < 1):
        raise ValueError("--num-prompts and --max-concurrency must be at least 1")
    result = asyncio.run(run_async(args))
    failed = [e for e in result["errors"] if e]
    if failed:
        print(f"first error of {len(failed)}: {failed[0]}")
    if args.save_result or args.result_filename:
        path = args.result_filename or _default_filename(result)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {path}")


def _default_filename(result: dict[str, Any]) -> str:
    concurrency = f"-concurrency{result['max_concurrency']}" if result["max_concurrency"] else ""
    model = str(result["model_id"]).rstrip("/").split("/")[-1]
    return f"openai-{result['request_rate']}qps{concurrency}-{model}-{result['date']}.json"
