"""`twinbatch generate|serve|bench ...`: the command line, with engine flags named as in vLLM."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from twinbatch.config import EngineConfig, ParallelConfig
from twinbatch.core.step_plan import Reason
from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.entrypoints.openai.cli_args import add_serve_args
from twinbatch.models.presets import BUILTIN_MODEL
from twinbatch.sampling_params import SamplingParams
from twinbatch.version import __version__

if TYPE_CHECKING:
    from twinbatch import LLM
    from twinbatch.outputs import RequestOutput

# A DP rank's report of its last step can arrive just after generate() returns; wait this long at most for it.
STATS_WAIT_S = 5.0

WHY_NOT_MICROBATCHED = {
    Reason.BELOW_THRESHOLD: "batches under --dbo-decode-token-threshold {decode} / --dbo-prefill-token-threshold "
    "{prefill} tokens",
    Reason.RANK_DISAGREED: "another DP rank's batch did not qualify",
    Reason.EMPTY_MICROBATCH: "a rank's last microbatch would hold only padding",
    Reason.NOT_SUPPORTED: "requests sharing KV blocks",
}


class SubcommandParser(argparse.ArgumentParser):
    """Reports unknown arguments itself, under its own usage line. A plain subcommand parser hands them to the
    top-level parser, whose usage shows none of the subcommand's flags."""

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _generate(args: argparse.Namespace) -> None:
    from twinbatch import LLM

    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()
    if config.parallel.node_rank > 0:
        from twinbatch.engine.launcher import run_headless

        sys.exit(run_headless(config))  # serves node 0's front end until it stops
    if not args.prompt:
        raise ValueError("give at least one --prompt")
    note = random_weights_note(engine_args, config)
    if note:
        print(note, file=sys.stderr)
    start = time.perf_counter()
    llm = LLM(**vars(engine_args))
    try:
        loaded = time.perf_counter()
        outputs = llm.generate(args.prompt, _sampling_params(args), use_tqdm=False)
        done = time.perf_counter()
        _print_outputs(outputs)
        n = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"loaded in {loaded - start:.1f} s; generated {n} tokens in {done - loaded:.2f} s", file=sys.stderr)
        if config.parallel.enable_dbo:
            print(dbo_summary(final_dbo_counts(llm), config.parallel), file=sys.stderr)
    finally:
        llm.shutdown()


def random_weights_note(engine_args: EngineArgs, config: EngineConfig) -> str | None:
    """The built-in model and the presets have no weight files, and --load-format dummy skips a checkpoint's: say
    so before anyone reads meaning into the text."""
    if config.load_format != "dummy":
        return None
    model = engine_args.model or BUILTIN_MODEL
    return f"note: the weights of {model} are random (load format dummy): the text is gibberish"


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.sampling_seed, ignore_eos=args.ignore_eos)  # fmt: skip


def _print_outputs(outputs: list[RequestOutput]) -> None:
    for out in outputs:
        c = out.outputs[0]
        print(f"Prompt: {out.prompt!r}\nOutput: {c.text!r}\nTokens: {c.token_ids} ({c.finish_reason})\n")


def final_dbo_counts(llm: LLM) -> dict[str, int]:
    """The DBO step counts summed over DP ranks, once every rank has reported its last step. The ranks step in
    lockstep and each counts every step, so the reports are complete when every rank's total is the same."""
    deadline = time.monotonic() + STATS_WAIT_S
    size = llm.llm_engine.config.parallel.data_parallel_size
    while not _ranks_agree(llm.get_stats(), size) and time.monotonic() < deadline:
        llm.llm_engine.step(timeout=0.05)  # reads the reports that arrived
    return llm.get_stats()["dbo"]


def _ranks_agree(stats: dict, size: int) -> bool:
    ranks = stats.get("ranks", {0: stats})
    return len(ranks) == size and len({sum(r["dbo"].values()) for r in ranks.values()}) == 1


def dbo_summary(counts: dict[str, int], parallel: ParallelConfig) -> str:
    """One line: how many steps were microbatched and, for the others, why not."""
    total, done = sum(counts.values()), counts.get(Reason.MICROBATCHED.value, 0)
    thresholds = {"decode": parallel.dbo_decode_token_threshold, "prefill": parallel.dbo_prefill_token_threshold}
    why = [f"{counts[r.value]} {r.value} ({text.format(**thresholds)})"
           for r, text in WHY_NOT_MICROBATCHED.items() if counts.get(r.value)]  # fmt: skip
    line = f"DBO: {done} of {total} steps microbatched (summed over {parallel.data_parallel_size} DP ranks)"
    return line + ("; not microbatched: " + ", ".join(why) if why else "")


def _serve(args: argparse.Namespace) -> None:
    from twinbatch.entrypoints.openai.api_server import run_server

    run_server(args)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    gen.add_argument("--prompt", action="append", help="a prompt; give several for a batch (not on nodes other than 0)")
    gen.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate per prompt (default: 32)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 samples greedily (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens that make up this "
                     "probability (default: 1, all)")  # fmt: skip
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (default: 0, all)")
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    EngineArgs.add_cli_args(gen)
    gen.set_defaults(func=_generate)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinbatch", description="MoE inference with dual-batch overlap")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=SubcommandParser)
    _add_generate(sub)
    server = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_args(server)
    server.set_defaults(func=_serve)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from twinbatch.bench import serve, step, throughput

    step.add_parser(bench)
    serve.add_parser(bench)
    throughput.add_parser(bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)  # the engine has already stopped every worker
