"""The engine loop: requests in, one scheduled step at a time, outputs out."""

from __future__ import annotations

import bisect
import itertools
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from twinbatch.config import EngineConfig
from twinbatch.core.block_manager import BlockManager
from twinbatch.core.detokenizer import IncrementalDetokenizer
from twinbatch.core.dp_sync import DPSync
from twinbatch.core.overlap_tuner import StepTimer
from twinbatch.core.request import PLACEHOLDER, Request
from twinbatch.core.scheduler import Scheduler, SchedulerOutput
from twinbatch.core.step_plan import StepPlan, StepPlanner, auto_tuner, overlap_counts
from twinbatch.distributed.parallel_state import ParallelState
from twinbatch.engine.input_processor import InputProcessor, Prompt
from twinbatch.layers.sampler import LogprobsTensors, compute_logprobs, sample
from twinbatch.outputs import CompletionOutput, Logprob, RequestError, RequestOutput, error_line
from twinbatch.sampling_params import SamplingParams
from twinbatch.tokenizer import load_tokenizer
from twinbatch.worker.model_runner import ModelRunner, ModelRunnerOutput, SampledTokens

logger = logging.getLogger(__name__)
STATS_LOG_EVERY = 1000  # steps
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)  # fmt: skip


@dataclass
class Sampled:
    """A launched step's sampled tokens: on the device (the next step's inputs may read them) and being copied to
    the host with the logprobs; `copied` is recorded after the copies (None on CPU, where they are done)."""

    requests: list[Request]  # one a row
    tokens: SampledTokens
    host_tokens: torch.Tensor
    logprobs: LogprobsTensors | None
    prompt_logprobs: dict[str, LogprobsTensors]
    copied: torch.cuda.Event | None


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Starts copying t to the host without waiting for the device (into pinned memory on GPU)."""
    return t.to("cpu", non_blocking=True)


def _copied(device: torch.device) -> torch.cuda.Event | None:
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


@dataclass
class StepTimes:
    """The wall time of the steps that ran the model, as a histogram (STEP_BUCKETS, seconds), and how much of
    it the device ran the step (execute_model between CUDA events on GPU; the host clock on CPU, where the host
    is the device). What is left is host time outside the model: scheduling, input preparation before the first
    kernel, sampling's bookkeeping, stop checks, detokenization."""

    counts: list[int] = field(default_factory=lambda: [0] * len(STEP_BUCKETS))  # per bucket, not cumulative
    count: int = 0
    sum: float = 0.0
    device_sum: float = 0.0

    def observe(self, seconds: float, device_seconds: float) -> None:
        if seconds <= STEP_BUCKETS[-1]:  # a longer step counts in +Inf alone (count)
            self.counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds
        self.device_sum += min(device_seconds, seconds)

    def as_dict(self) -> dict:
        """{"buckets": [(upper bound, cumulative steps)], "count", "sum", "host_sum": sum - device time}."""
        cumulative = itertools.accumulate(self.counts)
        return {"buckets": list(zip(STEP_BUCKETS, cumulative, strict=True)), "count": self.count, "sum": self.sum,
                "host_sum": self.sum - self.device_sum}  # fmt: skip


class LLMEngine:
    def __init__(self, config: EngineConfig, parallel: ParallelState | None = None, detokenize: bool = True) -> None:
        """detokenize=False (a DP rank serving a front end, which detokenizes: engine/output_processor.py): outputs
        carry no text, and stop strings are left to the front end."""
        self.config = config
        self.detokenize = detokenize
        parallel = parallel or ParallelState()
        self.tokenizer = load_tokenizer(config.tokenizer_path)
        self.process_input = InputProcessor(self.tokenizer, config.scheduler.max_model_len, config.model.vocab_size)
        self.model_runner = ModelRunner(config, parallel)
        self.dp_sync = DPSync(parallel.cpu_group, parallel.dp_rank, parallel.dp_size)
        self.stopped = False  # set when every DP rank agreed to stop
        self.planner = StepPlanner(config.parallel, self.model_runner.buckets, tuner=auto_tuner(config.parallel))
        self.timer = StepTimer(config.device, config.parallel.data_parallel_rank)
        self.step_times = StepTimes()
        self.graph_capture: dict[str, float] = {}  # how many graphs were captured at start-up, in what time and memory
        if self.model_runner.graphs is not None:
            self.planner.check(self.dp_sync.sync(0, plan_key=self.planner.key()))  # all ranks capture alike
            progress = config.parallel.data_parallel_rank == 0  # a bar on stderr
            self.graph_capture = self.model_runner.capture_graphs(self.planner.graph_labels(), progress)
        self.dbo_stats: Counter[str] = Counter()  # steps by DBO outcome (step_plan.Reason values)
        self.overlap_stats: Counter[tuple[str, str]] = Counter()  # steps by (StepPlan.label, Reason value)
        self.num_prompt_tokens = 0  # of every request added, ever
        self.num_generation_tokens = 0  # every token sampled, ever
        self.num_aborted = 0  # requests aborted before they finished, ever
        self.block_manager = BlockManager(config.cache.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.async_scheduling = config.scheduler.async_scheduling
        self.in_flight: Sampled | None = None  # the step launched, whose tokens are still to be read (async)
        self.generator = torch.Generator(config.device).manual_seed(config.seed)
        self.faults = _parse_fault(os.environ.get("TWINBATCH_REQUEST_FAULT"))

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        """Validates and queues a request; raises ValueError (and changes nothing) on bad input."""
        request_id, text, token_ids = self.process_input.new_request(prompt, params, request_id, self.requests)
        self._inject_fault("add", token_ids)
        gen = None if params.seed is None else torch.Generator(self.config.device).manual_seed(params.seed)
        tokenizer, stops = (self.tokenizer, params.stop_strings) if self.detokenize else (None, [])
        detokenizer = IncrementalDetokenizer(tokenizer, params.skip_special_tokens, stops)
        req = Request(request_id, text, token_ids, params, generator=gen, detokenizer=detokenizer)
        self.requests[request_id] = req
        self.num_prompt_tokens += len(token_ids)
        self.scheduler.add_request(req)
        return request_id

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            self._finish(req, "abort")
            self.num_aborted += 1

    def get_stats(self) -> dict:
        """Engine statistics; `overlap` counts steps by overlap mode ("off", "dbo", "sbo2": SBO in 2 rounds) and
        the reason it was chosen; `dbo` counts steps by DBO outcome: microbatched, or why not (this rank's view);
        `cuda_graphs` lists the captured graphs as ("decode", batch bucket, context bucket, mode) or ("prefill",
        token bucket, request rows, mode), the mode a StepPlan label ("off", "dbo", "sbo2"), and
        `cuda_graph_capture` the start-up capture ({"graphs", "seconds", "memory_bytes"}; empty without graphs);
        `step_seconds` the steps that ran the model (StepTimes.as_dict). The token counts are totals since the
        engine started."""
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.block_manager.usage,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_aborted": self.num_aborted,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generation_tokens": self.num_generation_tokens,
            "dbo": dict(self.dbo_stats),
            "overlap": overlap_counts(self.overlap_stats.items()),
            "cuda_graphs": sorted(self.model_runner.graphs.graphs) if self.model_runner.graphs else [],
            "cuda_graph_capture": self.graph_capture,
            "step_seconds": self.step_times.as_dict(),
        }

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.in_flight is not None

    def step(self, stop: bool = False) -> list[RequestOutput]:
        """Runs one scheduled step; returns outputs of the requests that produced a token or finished.

        With asynchronous scheduling the step is launched and the outputs returned are the step before's: its
        tokens were copied to the host while this one was scheduled and prepared, so the GPU never waits for the
        host between steps. A request that finished in the step before but was scheduled again gives nothing
        more (its token is dropped; its KV blocks were freed when it finished).

        With data parallelism every rank calls this in lockstep: a rank without work runs a dummy batch while
        any rank has work. `stop` votes to leave the loop; `self.stopped` tells whether any rank did.
        """
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        if self.faults:  # fault-injection tests only: no loop over the batch in a normal step
            for s in batch.scheduled:
                self._inject_fault("step", s.request.prompt_token_ids)
        vote = self.planner.vote(batch)
        sync = self.dp_sync.sync(batch.num_tokens, stop, vote is None, batch.decode_only, batch.num_context_tokens,
                                 self.timer.report_us(), self.planner.key())  # fmt: skip
        self.stopped = sync.stop
        launched = None
        if sync.any_work and not sync.stop:
            plan = self.planner.plan(batch, vote, sync)
            self.timer.taken()
            self._count(plan)
            with self.timer.timing(plan.label):
                out = self.model_runner.execute_model(plan, self.in_flight and self.in_flight.tokens)
            self.scheduler.update_after_step(batch)
            launched = self._sample(batch, out)
        done, self.in_flight = (self.in_flight, launched) if self.async_scheduling else (launched, None)
        if done is None:
            return []
        outputs = self._process(done)
        self.step_times.observe(time.perf_counter() - start, self.timer.finished() / 1e6)
        if launched is not None and logger.isEnabledFor(logging.DEBUG):
            _log_step(batch, plan, time.perf_counter() - start)
        return outputs

    def _count(self, plan: StepPlan) -> None:
        """Steps by overlap mode and why; with DBO on, by DBO outcome: microbatched, or why not."""
        self.overlap_stats[plan.label, plan.reason.value] += 1
        parallel = self.config.parallel
        if parallel.enable_dbo:
            self.dbo_stats[plan.reason.value] += 1
            if self.dbo_stats.total() % STATS_LOG_EVERY == 0:
                logger.info("DBO steps on DP rank %d: %s", parallel.data_parallel_rank, dict(self.dbo_stats))

    def _sample(self, batch: SchedulerOutput, out: ModelRunnerOutput) -> Sampled:
        """Samples on the device and starts copying the tokens and logprobs to the host; under asynchronous
        scheduling each sampling request gets a placeholder token, to be replaced when the copy is read."""
        sampled = [s.request for s in batch.scheduled if s.request.num_computed_tokens == s.request.num_tokens]
        params = [r.sampling_params for r in sampled]
        tokens = sample(out.logits, params, [r.generator for r in sampled], self.generator)
        k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        logprobs = compute_logprobs(out.logits, tokens, k) if k is not None else None
        if self.async_scheduling:
            for req in sampled:
                req.output_token_ids.append(PLACEHOLDER)
                req.num_pending += 1
        rows = {req.request_id: i for i, req in enumerate(sampled)}
        host_logprobs = logprobs.to_host() if logprobs is not None else None
        prompt_logprobs = {rid: t.to_host() for rid, t in out.prompt_logprobs.items()}
        return Sampled(sampled, SampledTokens(tokens, rows), _to_host(tokens), host_logprobs, prompt_logprobs,
                       _copied(self.config.device))  # fmt: skip

    def _process(self, done: Sampled) -> list[RequestOutput]:
        """A step's tokens, once on the host: stop checks, detokenization, outputs. Requests that finished (or
        were aborted) since the step was scheduled are left out."""
        if done.copied is not None:
            done.copied.synchronize()
        for request_id, tensors in done.prompt_logprobs.items():
            if (req := self.requests.get(request_id)) is not None:
                req.prompt_logprobs += _logprob_dicts(tensors, req.sampling_params.prompt_logprobs)
        outputs = []
        for i, (req, token) in enumerate(zip(done.requests, done.host_tokens.tolist(), strict=True)):
            if req.is_finished:
                continue
            if req.logprobs is not None:
                req.logprobs += _logprob_dicts(done.logprobs[i : i + 1], req.sampling_params.logprobs)
            self.num_generation_tokens += 1
            outputs.append(self._advance(req, token))
        for req in done.requests:
            if req.is_finished:
                self.requests.pop(req.request_id, None)
        return outputs

    def _advance(self, req: Request, token: int) -> RequestOutput:
        """Adds a sampled token (in place of its placeholder), checks the stop conditions, makes the output. What
        raises here belongs to this request: it fails alone, and the step's other requests go on."""
        try:
            self._inject_fault("output", req.prompt_token_ids)
            req.first_token_time = req.first_token_time or time.monotonic()
            if req.num_pending:
                req.output_token_ids[len(req.output_token_ids) - req.num_pending] = token
                req.num_pending -= 1
            else:
                req.output_token_ids.append(token)
            self._check_stop(req, token)
            return self._make_output(req)
        except Exception as e:
            logger.exception("request %s failed while its output was processed", req.request_id)
            self._finish(req, "error")
            return self.failed_output(req.request_id, RequestError(error_line(e), bad_input=False))

    def failed_output(self, request_id: str, error: RequestError) -> RequestOutput:
        return RequestOutput.failed(request_id, error, self.config.parallel.data_parallel_rank)

    def _inject_fault(self, stage: str, token_ids: list[int]) -> None:
        if self.faults and any(at == stage and token in token_ids for at, token in self.faults):
            raise RuntimeError(f"injected fault (TWINBATCH_REQUEST_FAULT) at {stage}")

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.sampling_params
        stop_string = req.detokenizer.add_token(token)
        reason, stop = None, None
        if token in p.stop_token_ids:
            reason, stop = "stop", token
        elif token in self.config.model.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif stop_string is not None:
            reason, stop = "stop", stop_string
        elif req.at_length_limit(self.config.scheduler.max_model_len, pending=False):
            reason = "length"
        if reason is not None:
            req.stop_reason = stop
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str) -> None:
        """Ends a request; a token it still has on the device is dropped."""
        del req.output_token_ids[len(req.output_token_ids) - req.num_pending :]
        req.num_pending = 0
        self.scheduler.finish(req, reason)

    def _make_output(self, req: Request) -> RequestOutput:
        """Cumulative output: all tokens so far, and the text that is final so far (all of it once finished)."""
        text = req.detokenizer.final_text(req.is_finished)
        logprobs = list(req.logprobs) if req.logprobs is not None else None
        completion = CompletionOutput(0, text, req.resolved_output, req.finish_reason, req.stop_reason, logprobs)
        prompt_logprobs = req.prompt_logprobs if req.num_computed_tokens >= len(req.prompt_token_ids) else None
        # the front end may end a request on a stop string: it then needs the metrics so far
        ended_elsewhere = not self.detokenize and req.sampling_params.stop_strings
        metrics = req.metrics(time.monotonic()) if req.is_finished or ended_elsewhere else None
        rank = self.config.parallel.data_parallel_rank
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], req.is_finished,
                             prompt_logprobs, metrics=metrics, engine_index=rank)  # fmt: skip


def _log_step(batch: SchedulerOutput, plan: StepPlan, seconds: float) -> None:
    """One line a step (TWINBATCH_LOG_LEVEL=DEBUG): what it held, how it ran, and how long step() took (with
    asynchronous scheduling that includes waiting for the step before)."""
    decodes = sum(s.num_new_tokens == 1 for s in batch.scheduled)
    context = batch.num_context_tokens - batch.num_tokens  # the step's tokens are counted as computed by now
    graph = "eager" if plan.graph is None else f"{'prefill' if plan.graph.prefill else 'decode'} {plan.graph.tokens}"
    logger.debug("step: %d decodes, %d prefill tokens in %d requests, %d context tokens; %s, %s; %.1f ms", decodes,
                 batch.num_tokens - decodes, len(batch.scheduled) - decodes, context, plan.label,
                 graph, seconds * 1e3)  # fmt: skip


def _parse_fault(spec: str | None) -> list[tuple[str, int]]:
    """TWINBATCH_REQUEST_FAULT="STAGE:T[,STAGE:T...]" (fault-injection tests): a request whose prompt holds token id T
    raises at STAGE: `add` (fails that request), `output` (fails it once it has a token), `step` (fails the step)."""
    faults = []
    for part in filter(None, (spec or "").split(",")):
        stage, _, token = part.partition(":")
        if stage not in ("add", "output", "step") or not token.isdigit():
            raise ValueError(f"TWINBATCH_REQUEST_FAULT={spec!r}: use add:T, output:T or step:T (T a token id)")
        faults.append((stage, int(token)))
    return faults


def _logprob_dicts(tensors: LogprobsTensors, k: int) -> list[dict[int, Logprob]]:
    """One dict per row: the scored token first, then the top-k in rank order (a token already listed keeps its
    first entry)."""
    ids = tensors.logprob_token_ids[:, : k + 1].tolist()
    values = tensors.logprobs[:, : k + 1].tolist()
    ranks = tensors.selected_token_ranks.tolist()
    dicts = []
    for row_ids, row_values, rank in zip(ids, values, ranks, strict=True):
        d = {row_ids[0]: Logprob(row_values[0], rank)}
        for j in range(1, k + 1):
            d.setdefault(row_ids[j], Logprob(row_values[j], j))
        dicts.append(d)
    return dicts
