"""`twinbatch bench throughput`: offline throughput of the engine, as vLLM's `bench throughput` with random
prompts: the whole engine loop (scheduling, steps, sampling, outputs) as `LLM.generate` drives it, no server.

    twinbatch bench throughput --num-prompts 64 --input-len 32 --output-len 64 [--async-scheduling] [--json]

Prompts are random token ids (seeded); every request generates exactly --output-len tokens (ignore_eos). One
untimed warm-up batch first, then --num-iters timed ones; the report gives each run and the median.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.engine.dp_client import DPEngineClient
from twinbatch.engine.llm_engine import LLMEngine
from twinbatch.sampling_params import SamplingParams


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("throughput", help="offline throughput of the engine on random prompts")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per run (default: 64)")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (default: 32)")
    p.add_argument("--output-len", type=int, default=64, help="generated tokens per request (default: 64)")
    p.add_argument("--num-iters", type=int, default=3, help="timed runs (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    report = measure(args)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['output_tokens_per_s']:.1f} output tokens/s, {report['requests_per_s']:.2f} requests/s "
              f"(median of {len(report['runs_s'])} runs of {args.num_prompts} requests)")  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    engine = DPEngineClient(config) if config.parallel.data_parallel_size > 1 else LLMEngine(config)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, config.model.vocab_size) for _ in range(args.input_len)]
               for _ in range(args.num_prompts)]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    runs = []
    try:
        for _ in range(args.num_iters + 1):  # the first run warms up
            start = time.perf_counter()
            _generate(engine, prompts, params)
            runs.append(time.perf_counter() - start)
    finally:
        if isinstance(engine, DPEngineClient):
            engine.shutdown()
    runs = runs[1:]
    median = statistics.median(runs)
    return {
        "setup": {"model": args.model, "num_prompts": args.num_prompts, "input_len": args.input_len,
                  "output_len": args.output_len, "async_scheduling": config.scheduler.async_scheduling,
                  "device": str(config.device), "dtype": str(config.dtype)},
        "runs_s": runs,
        "median_s": median,
        "output_tokens_per_s": args.num_prompts * args.output_len / median,
        "requests_per_s": args.num_prompts / median,
    }  # fmt: skip


def _generate(engine: LLMEngine | DPEngineClient, prompts: list[list[int]], params: SamplingParams) -> None:
    """Every prompt to the end, as LLM.generate runs them; checks each got all its tokens."""
    unfinished = {engine.add_request(p, params) for p in prompts}
    while unfinished:
        for out in engine.step():
            if out.finished:
                assert len(out.outputs[0].token_ids) == params.max_tokens, out
                unfinished.discard(out.request_id)
