"""`twinbatch generate ...`: the command line, with engine flags named as in vLLM."""

from __future__ import annotations

import argparse
import sys
import time

from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.entrypoints.openai.cli_args import add_serve_args


def _generate(args: argparse.Namespace) -> None:
    from twinbatch import LLM, SamplingParams

    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    if config.parallel.node_rank > 0:
        from twinbatch.engine.launcher import run_headless

        sys.exit(run_headless(config))  # serves node 0's front end until it stops
    if not args.prompt:
        raise ValueError("give at least one --prompt")
    start = time.perf_counter()
    llm = LLM(**vars(engine_args))
    loaded = time.perf_counter()
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
        ignore_eos=args.ignore_eos,
    )
    outputs = llm.generate(args.prompt, params, use_tqdm=False)
    done = time.perf_counter()
    for out in outputs:
        c = out.outputs[0]
        print(f"Prompt: {out.prompt!r}\nOutput: {c.text!r}\nTokens: {c.token_ids} ({c.finish_reason})\n")
    n = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"loaded in {loaded - start:.1f} s; generated {n} tokens in {done - loaded:.2f} s", file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from twinbatch.entrypoints.openai.api_server import run_server

    run_server(args)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinbatch", description="MoE inference with dual-batch overlap")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    gen.add_argument("--prompt", action="append", help="may be given several times (not on nodes other than 0)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true")
    EngineArgs.add_cli_args(gen)
    gen.set_defaults(func=_generate)
    server = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_args(server)
    server.set_defaults(func=_serve)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from twinbatch.bench import serve, step

    step.add_parser(bench)
    serve.add_parser(bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)  # the engine has already stopped every worker
