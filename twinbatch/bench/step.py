"""`twinbatch bench step`: time one model step with DBO off and on, in one launch, on the same shapes.

Each DP rank is a process (gloo on CPU, NCCL on GPU) that builds the model with dummy weights and a synthetic
batch: `--tokens-per-rank` decodes at `--context-len`, or one prefill chunk of that many tokens. No scheduler
and no front end, only ModelRunner.execute_model, so the figures are the model step itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tqdm import tqdm

from twinbatch.bench.profile import profile_step
from twinbatch.bench.roofline import hbm_bandwidth_gbs, hbm_roofline_ms
from twinbatch.bench.step_report import mode_summary, plot_sweep, report_keys, table
from twinbatch.config import EngineConfig
from twinbatch.core.block_manager import BlockManager
from twinbatch.core.overlap_tuner import TRIALS, OverlapTuner
from twinbatch.core.request import Request
from twinbatch.core.scheduler import ScheduledRequest, SchedulerOutput
from twinbatch.core.step_plan import OverlapMode, StepPlan, uniform_plan
from twinbatch.distributed.all2all import BACKENDS
from twinbatch.distributed.collectives import COLLECTIVES, Collectives
from twinbatch.distributed.parallel_state import destroy_distributed, init_distributed
from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.engine.launcher import free_port
from twinbatch.engine.worker_main import worker_device
from twinbatch.models.presets import BUILTIN_MODEL
from twinbatch.sampling_params import SamplingParams
from twinbatch.worker.model_runner import ModelRunner

Times = dict[str, list[tuple[float, float]]]  # mode -> (step, host) seconds of each measured step


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("step", help="time model steps with DBO off and on (dummy weights, synthetic batch)")
    p.add_argument("--tokens-per-rank", type=int, default=256, help="tokens of each rank's batch (default: 256)")
    p.add_argument("--phase", choices=["decode", "prefill"], default="decode",
                   help="decode: that many one-token requests; prefill: one request of that many tokens")  # fmt: skip
    p.add_argument("--context-len", type=int, default=1024, help="cached tokens per decode request (default: 1024)")
    p.add_argument("--num-steps", type=int, default=20, help="timed steps per mode (default: 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar (on stderr)")
    p.add_argument("--sweep", default=None, help="comma-separated tokens per rank; writes --sweep-png")
    p.add_argument("--sweep-png", default="dbo_sweep.png", help="the --sweep chart (default: dbo_sweep.png)")
    p.add_argument("--hbm-bandwidth-gbs", type=float, default=None, help="for the roofline (default: by GPU model)")
    p.add_argument("--profile", default=None, help="directory for Perfetto traces and kernel tables of one step "
                   "in each mode measured")  # fmt: skip
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run, load_format="dummy")


def run(args: argparse.Namespace) -> None:
    points = [int(t) for t in args.sweep.split(",")] if args.sweep else [args.tokens_per_rank]
    reports = []
    for report in measure(args, points):
        reports.append(report)
        print(json.dumps(report) if args.json else table(report), flush=True)
    if args.sweep:
        plot_sweep(reports, args.sweep_png)


def measure(args: argparse.Namespace, points: list[int]) -> Iterator[dict[str, Any]]:
    """One launch of every DP rank, which builds the model once and measures each number of tokens per rank in
    `points`; yields rank 0's report of each as it comes."""
    engine_args = EngineArgs.from_cli_args(args)
    sizing = argparse.Namespace(**{**vars(args), "tokens_per_rank": max(points)})
    dp = engine_args.data_parallel_size  # DP: expert parallelism and DBO on; one rank: EP over a world of one if asked
    engine_args = dataclasses.replace(engine_args, overlap="dbo" if dp > 1 else "off",
                                      enable_expert_parallel=engine_args.enable_expert_parallel or dp > 1,
                                      **_cache_size(sizing), master_port=free_port())  # fmt: skip
    config = engine_args.create_engine_config()
    results = mp.get_context("spawn").SimpleQueue()
    size = config.parallel.data_parallel_size
    ctx = mp.start_processes(_bench_rank, args=(config, vars(args), points, results), nprocs=size, join=False,
                             start_method="spawn")  # fmt: skip
    for _ in points:
        while results.empty():  # a rank that fails ends the launch with its error instead of a hang
            if ctx.join(timeout=0.5):
                raise RuntimeError("a benchmark rank exited before reporting")
        yield results.get()
    while not ctx.join():
        pass


def _cache_size(args: argparse.Namespace) -> dict[str, int]:
    """A KV cache just large enough for the synthetic batch."""
    decode = args.phase == "decode"
    seq = args.context_len + 1 if decode else args.tokens_per_rank  # tokens of one request
    requests = args.tokens_per_rank if decode else 1
    blocks = requests * -(-seq // args.block_size) + 1
    return {"num_gpu_blocks_override": blocks, "max_model_len": seq, "max_num_batched_tokens": args.tokens_per_rank,
            "max_num_seqs": requests}  # fmt: skip


def synthetic_batch(config: EngineConfig, tokens: int, phase: str, context_len: int) -> SchedulerOutput:
    """decode: `tokens` requests of context_len cached tokens plus one new; prefill: one request of `tokens`."""
    blocks = BlockManager(config.cache.num_blocks, config.cache.block_size)
    vocab, params = config.model.vocab_size, SamplingParams(max_tokens=1)
    shapes = [(context_len, 1)] * tokens if phase == "decode" else [(0, tokens)]
    out = SchedulerOutput()
    for i, (cached, new) in enumerate(shapes):
        req = Request(str(i), None, [(i * 31 + j) % vocab for j in range(cached + new)], params)
        blocks.allocate(req, cached + new)
        req.num_computed_tokens = cached
        out.scheduled.append(ScheduledRequest(req, new))
    return out


def _bench_rank(rank: int, config: EngineConfig, opts: dict[str, Any], points: list[int], results: Any) -> None:
    parallel = dataclasses.replace(config.parallel, data_parallel_rank=rank)
    config = dataclasses.replace(config, parallel=parallel, device=worker_device(config, rank))
    state = init_distributed(config.parallel, config.device)
    runner = ModelRunner(config, state)
    for cache in runner.kv_caches:
        cache.zero_()  # the synthetic context: defined values, not whatever memory held
    for tokens in points:
        opts = {**opts, "tokens_per_rank": tokens}
        batch = synthetic_batch(config, tokens, opts["phase"], opts["context_len"])
        with _progress(rank, runner, batch, opts) as bar:
            times = (
                _measure_modes(runner, batch, state.cpu_group, opts, bar)
                if runner.all2all is not None
                else {"single": _time(_step(runner, batch, OverlapMode.OFF), runner, None, opts, bar)}
            )
        if rank == 0:
            results.put(_report(times, opts, config, runner, batch))
        if runner.graphs is not None:
            runner.graphs.clear()  # the next point has other buckets; free this one's memory
    if opts["profile"]:
        modes = {"single": (OverlapMode.OFF, 1)}
        if runner.all2all is not None:
            modes = {report_keys(label)[0]: m for label, m in bench_modes(config).items()}
        for name, (mode, rounds) in modes.items():
            step = _step(runner, batch, mode, rounds=rounds)
            profile_step(step, opts["profile"], f"{name}_rank{rank}", echo=rank == 0)
    runner.shutdown()
    destroy_distributed()


def _progress(rank: int, runner: ModelRunner, batch: SchedulerOutput, opts: dict) -> tqdm:
    """Rank 0's bar, on stderr, over every step that _measure_modes (or the single mode) times, warm-up included."""
    modes = list(bench_modes(runner.config)) if runner.all2all is not None else []
    per_mode = 3 if _plan(runner, batch, OverlapMode.OFF).graph else 2  # timed, [eager,] compute only
    steps = opts["warmup"] + opts["num_steps"]
    auto = steps + len(modes) * (TRIALS + 1) if modes else 0  # at least: its trials, then its kept steps
    total = max(1, per_mode * len(modes) + len(modes) - 1) * steps + auto
    desc = f"{opts['tokens_per_rank']} tokens per rank"
    return tqdm(total=total, desc=desc, unit="step", disable=rank != 0 or opts["disable_tqdm"])


def bench_modes(config: EngineConfig) -> dict[str, tuple[OverlapMode, int]]:
    """The modes a launch with expert parallelism measures, by label: off, dbo (with DP ranks to split for), and
    SBO in 2 and 4 rounds where the backend supports it and each rank holds that many experts."""
    local = config.model.num_experts // config.parallel.ep_size
    sbo = {f"sbo{r}": (OverlapMode.SBO, r) for r in SBO_ROUNDS if r <= local}
    sbo = sbo if BACKENDS[config.parallel.all2all_backend].supports_sbo else {}
    dbo = {"dbo": (OverlapMode.DBO, 1)} if config.parallel.enable_dbo else {}
    return {"off": (OverlapMode.OFF, 1), **dbo, **sbo}


SBO_ROUNDS = (2, 4)


def _measure_modes(runner: ModelRunner, batch: SchedulerOutput, group: Any, opts: dict, bar: tqdm) -> Times:
    """Every mode of bench_modes, as CUDA graphs where the engine would replay the step as one (and eagerly too);
    then each one's decomposition: compute only (communication replaced by local copies of the same shapes), and
    communication only (the mode's recorded collectives, replayed back to back)."""
    modes = bench_modes(runner.config)

    def step(label: str, graph: bool = True) -> Callable[[], object]:
        mode, rounds = modes[label]
        return _step(runner, batch, mode, graph, rounds)

    def timed(fn: Callable[[], object]) -> list[tuple[float, float]]:
        return _time(fn, runner, group, opts, bar)

    graphed = _plan(runner, batch, OverlapMode.OFF).graph is not None
    times = {report_keys(label)[0]: timed(step(label)) for label in modes}
    if graphed:
        times |= {report_keys(label)[0] + "_eager": timed(step(label, graph=False)) for label in modes}
        runner.graphs.clear()  # the compute-only steps are captured anew, without communication
    with COLLECTIVES.skipped():
        times |= {report_keys(label)[1]: timed(step(label)) for label in modes}
    for label in list(modes)[1:]:
        COLLECTIVES.recording = []
        if graphed:
            runner.graphs.clear()
        step(label, graph=False)()
        recorded, COLLECTIVES.recording = COLLECTIVES.recording, None
        times[report_keys(label)[2]] = timed(lambda recorded=recorded: Collectives.replay(recorded))
    if graphed:
        runner.graphs.clear()
    times["auto"], times["auto_kept"] = _measure_auto({label: step(label) for label in modes}, runner, group, opts, bar)
    return times


def _plan(runner: ModelRunner, batch: SchedulerOutput, mode: OverlapMode, graph: bool = True, rounds: int = 1
          ) -> StepPlan:  # fmt: skip
    """The engine's plan of the step, in `mode` (SBO in `rounds`) whatever the DBO vote: a CUDA graph where the
    engine would replay one (decode, or prefill in the packed layout), unless `graph` is False. Every rank runs
    the same batch."""
    buckets = runner.buckets if graph else None
    return uniform_plan(runner.config.parallel, buckets, batch, mode, rounds, batch.num_tokens, batch.decode_only,
                        batch.num_context_tokens)  # fmt: skip


def _step(runner: ModelRunner, batch: SchedulerOutput, mode: OverlapMode, graph: bool = True, rounds: int = 1
          ) -> Callable[[], object]:  # fmt: skip
    plan = _plan(runner, batch, mode, graph, rounds)
    return lambda: runner.execute_model(plan)


def _time(fn: Callable[[], object], runner: ModelRunner, group: Any, opts: dict, bar: tqdm
          ) -> list[tuple[float, float]]:  # fmt: skip
    """(step, host) seconds of each measured step: host is until fn returns, before waiting for the GPU; a step
    whose host time equals its step time is bound by the host, not the GPU."""
    times = [_time_one(fn, runner, group, bar) for _ in range(opts["warmup"] + opts["num_steps"])]
    return times[opts["warmup"] :]


def _time_one(fn: Callable[[], object], runner: ModelRunner, group: Any, bar: tqdm) -> tuple[float, float]:
    if group is not None:
        dist.barrier(group=group)
    start = time.perf_counter()
    fn()
    host = time.perf_counter() - start
    if runner.device.type == "cuda":
        torch.cuda.synchronize()
    bar.update()
    return time.perf_counter() - start, host


def _measure_auto(steps: dict[str, Callable[[], object]], runner: ModelRunner, group: Any, opts: dict, bar: tqdm
                  ) -> tuple[list[tuple[float, float]], str]:  # fmt: skip
    """--overlap auto on the same batch: the tuner tries every mode, then the steps it runs in the mode it kept
    are timed (warm-up and timed steps as for every mode). Every rank records the slowest rank's step time, as
    the engine does, so all choose alike. -> (times, the mode kept)."""
    tuner, shape, kept = OverlapTuner(list(steps)), ("bench", 0), []
    while len(kept) < opts["warmup"] + opts["num_steps"]:
        label, why = tuner.choose(shape)
        step, host = _time_one(steps[label], runner, group, bar)
        slowest = torch.tensor([step])
        if group is not None:
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
        tuner.record(shape, label, label, 1e3 * slowest.item())
        if why == "auto_fastest":
            kept.append((step, host))
    return kept[opts["warmup"] :], tuner.choose(shape)[0]


def _report(
    times: Times, opts: dict, config: EngineConfig, runner: ModelRunner, batch: SchedulerOutput
) -> dict[str, Any]:
    def stats(step_host: list[tuple[float, float]]) -> dict[str, float]:
        t = [step for step, _ in step_host]
        q = statistics.quantiles(t, n=10, method="inclusive") if len(t) > 1 else t * 9
        median = statistics.median(t)
        return {"median_ms": 1e3 * median, "p10_ms": 1e3 * q[0], "p90_ms": 1e3 * q[-1],
                "host_median_ms": 1e3 * statistics.median(host for _, host in step_host),
                "tokens_per_s": opts["tokens_per_rank"] * config.parallel.data_parallel_size / median}  # fmt: skip

    kept = times.pop("auto_kept", None)
    report = {name: stats(t) for name, t in times.items()}
    if kept is not None:
        report["auto"]["kept"] = kept
    if "dbo_off" in report:
        report["modes"] = {label: mode_summary(report, label) for label in bench_modes(config) if label != "off"}
        report |= report["modes"].get("dbo", {})  # DBO's figures at the top too, under their first names
    report["setup"] = _setup(opts, config, runner)
    bandwidth = hbm_bandwidth_gbs(config.device, opts["hbm_bandwidth_gbs"])
    compute = report.get("compute_only", report.get("single"))  # DP=1: the step has no communication
    if bandwidth and opts["phase"] == "decode" and compute:
        report["hbm_roofline_ms"] = hbm_roofline_ms(runner, batch, bandwidth)
        report["compute_only_vs_roofline"] = compute["median_ms"] / report["hbm_roofline_ms"]
    return report


def _setup(opts: dict, config: EngineConfig, runner: ModelRunner) -> dict[str, Any]:
    """What was measured. The SMs left to DBO's collectives exist only on CUDA."""
    parallel = config.parallel
    setup = {"model": opts["model"] or BUILTIN_MODEL, "hf_overrides": opts["hf_overrides"],
             "load_format": config.load_format, **{k: opts[k] for k in ("phase", "tokens_per_rank", "context_len")},
             "dp": parallel.data_parallel_size, "backend": parallel.all2all_backend, "ubatches": parallel.ubatch_size,
             "attention_backend": config.attention_backend, "moe_backend": config.moe_backend,
             "compilation_level": config.compilation_level,
             "device": str(config.device), "dtype": str(config.dtype)}  # fmt: skip
    if config.device.type == "cuda":
        setup["dbo_comm_sms"] = runner.ubatched.comm_sms if runner.ubatched is not None else 0
    return setup
