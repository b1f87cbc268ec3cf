"""Turns a scheduled batch into model inputs, runs the model, and returns logits of the rows to sample.

Per-step inputs live in persistent buffers sized for the largest step (max_num_batched_tokens tokens,
max_num_seqs requests); each step's AttentionMetadata is a set of views into them, which DBO slices per
microbatch and CUDA graphs capture. What the step does is the StepPlan's to say (core/step_plan.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from twinbatch.config import EngineConfig
from twinbatch.core.scheduler import SchedulerOutput
from twinbatch.core.step_plan import (
    GraphBuckets,
    GraphStep,
    OverlapMode,
    StepPlan,
    parse_label,
    ubatch_bounds,
    uniform_plan,
)
from twinbatch.distributed.all2all import BACKENDS, All2AllBackend, make_all2all
from twinbatch.distributed.collectives import COLLECTIVES
from twinbatch.distributed.parallel_state import ParallelState
from twinbatch.layers.attention import PADDING_SLOT, AttentionMetadata
from twinbatch.layers.forward_context import ExpertGroup, ForwardContext
from twinbatch.layers.moe import ExpertPlacement, expert_rounds
from twinbatch.layers.sampler import LogprobsTensors, compute_logprobs
from twinbatch.models.causal_lm import CausalLM, ModelOptions
from twinbatch.models.loader import build_model
from twinbatch.worker.graph_runner import Forward, GraphRunner
from twinbatch.worker.inputs import InputBuffers, StepInputs
from twinbatch.worker.ubatch.ubatched_forward import UBatchedForward

logger = logging.getLogger(__name__)
PROMPT_LOGITS_CHUNK = 256  # rows of prompt logits at a time: [256, vocab] float32, not [prompt_len, vocab]


@dataclass
class SampledTokens:
    """A step's sampled tokens on the device, [num_sampled] int64, and the row of each request id."""

    tokens: torch.Tensor
    rows: dict[str, int]


@dataclass
class ModelRunnerOutput:
    logits: torch.Tensor  # [num_sampled, vocab] float32, in scheduling order
    # request id -> LogprobsTensors of the prompt tokens this step scored (ScheduledRequest.prompt_logprob_positions)
    prompt_logprobs: dict[str, LogprobsTensors] = field(default_factory=dict)


class ModelRunner:
    def __init__(self, config: EngineConfig, parallel: ParallelState | None = None) -> None:
        self.config, self.device = config, config.device
        sched, self.block_size = config.scheduler, config.cache.block_size
        self.max_blocks_per_req = -(-sched.max_model_len // self.block_size)
        parallel = parallel or ParallelState()
        self.all2all = _make_all2all(config, parallel)
        self.model = _build_model(config, parallel, self.all2all)
        self.kv_caches = [attn.kv_cache for attn in self.model.attention_layers()]
        self.buffers = InputBuffers(sched.max_num_batched_tokens, sched.max_num_seqs, self.max_blocks_per_req,
                                    config.device)  # fmt: skip
        # how many leading columns of each block-table row may be non-zero: a step copies only the columns in use
        # (and zeros over older ones) instead of max_model_len / block_size columns a row, 10240 for V2-Lite
        self.table_widths = np.zeros(sched.max_num_seqs, dtype=np.int64)
        self.ubatched = None
        self.forwards: dict[OverlapMode, Forward] = {OverlapMode.OFF: self._forward_whole}
        if self.all2all is not None and type(self.all2all).supports_sbo:
            self.forwards[OverlapMode.SBO] = self._forward_whole  # the MoE layers run the plan's expert rounds
        if config.parallel.enable_dbo:
            self.ubatched = UBatchedForward(self.model, config.parallel.ubatch_size, config.device)
            self.forwards[OverlapMode.DBO] = lambda inputs, plan: self.ubatched(inputs, plan.ubatch_bounds)
        self.graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and graph_capturable(config):
            self.graphs = GraphRunner(self.buffers, self.block_size, graph_buckets(config), self.forward)
        self.buckets = self.graphs.buckets if self.graphs is not None else None  # None: every step eager
        if self.model.model.compiled_layer is not None:
            self._compile_alone()

    def forward(self, inputs: StepInputs, plan: StepPlan) -> torch.Tensor:
        """The step's eager forward in the plan's overlap mode -> hidden states [num_tokens, hidden]."""
        return self.forwards[plan.mode](inputs, plan)

    def _forward_whole(self, inputs: StepInputs, plan: StepPlan) -> torch.Tensor:
        ctx = ForwardContext(inputs.attn, plan.max_tokens_across_dp, expert_groups=self._groups(plan.sbo_rounds))
        return self.model(inputs.input_ids, inputs.positions, ctx)

    @torch.inference_mode()
    def _compile_alone(self) -> None:
        """Compiles the layers now, on this rank alone: communication is replaced by local copies, so no rank
        waits in a collective (whose timeout a first compilation can outlast) while another compiles, and the
        first steps run compiled code. Padding-only steps of each kind cover Dynamo's 0/1 specialisations, and
        every other size reuses their graphs:
        - decode: 1 and 2 one-token requests; microbatched, 1 and 2 a microbatch;
        - prefill: an idle DP rank's dummy step (one token of no request), 1 and 2 two-token requests, and the
          whole token budget (which also takes the expert sort's large-input branch); microbatched, 2 and 4
          two-token requests a microbatch and the budget;
        - under SBO, the unsplit steps again with the MoE layers in rounds."""
        sched, n = self.config.scheduler, self.config.parallel.ubatch_size

        def padding(tokens: int, request_len: int) -> StepInputs:
            inputs = self.prepare_inputs(SchedulerOutput(), tokens, request_len)
            if request_len == 1:  # a context bound past one block, as decodes have (one block would specialise)
                inputs.attn.max_seq_len = min(2 * self.block_size + 1, sched.max_model_len)
            return inputs

        rows, budget = min(sched.max_num_seqs, sched.max_num_batched_tokens), sched.max_num_batched_tokens
        long = min(sched.max_model_len, max(2, -(-budget // rows)))  # the budget in as few requests as rows allow
        full = (min(budget, rows * long), long)
        steps = [(1, 1), (2, 1), (1, 0), (2, 2), (4, 2), full]
        ubatched = [(n, 1), (2 * n, 1), (4 * n, 2), (8 * n, 2), full] if self.ubatched is not None else []

        def fits(step: tuple[int, int]) -> bool:
            tokens, request_len = step
            return tokens <= budget and (request_len == 0 or -(-tokens // request_len) <= rows)

        parallel = self.config.parallel
        rounds = [1, parallel.sbo_rounds] if parallel.overlap == "sbo" and parallel.sbo_rounds > 1 else [1]
        with COLLECTIVES.skipped():
            for (tokens, request_len), r in itertools.product(filter(fits, steps), rounds):
                inputs = padding(tokens, request_len)
                ctx = ForwardContext(inputs.attn, tokens, expert_groups=self._groups(r))
                self.model(inputs.input_ids, inputs.positions, ctx)
            for tokens, request_len in filter(fits, ubatched):
                inputs = padding(tokens, request_len)
                self.ubatched(inputs, ubatch_bounds(tokens, n))

    @torch.inference_mode()
    def capture_graphs(self, labels: list[str], progress: bool) -> dict[str, float]:
        """Captures now every CUDA graph a step in one of the modes `labels` can replay (decode graphs of each
        batch and context bucket, prefill graphs of each token bucket and request-row count; DBO only where a
        microbatch gets a token), then closes the set: a later step without a graph runs eagerly. Every DP rank
        captures the same graphs in the same order, so their collectives line up. -> {"graphs", "seconds",
        "memory_bytes"}: how many, how long it took, and the memory it reserved."""
        graphs, buckets = self.graphs, self.buckets
        keys = buckets.keys(labels, self.request_rows, self.config.parallel.ubatch_size)
        torch.cuda.empty_cache()  # as every capture does: memory cached before would read as freed by the graphs
        start, reserved = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        for kind, b, c, label in tqdm(keys, desc="Capturing CUDA graphs", unit="graph", disable=not progress):
            mode, rounds = parse_label(label)
            plan = uniform_plan(self.config.parallel, buckets, SchedulerOutput(), mode, rounds, b, kind == "decode", b)
            inputs = self.prepare_inputs(plan.batch, plan.num_tokens, plan.pad_requests, plan.packed,
                                         min_rows=c if kind == "prefill" else 0)  # fmt: skip
            if kind == "decode":
                inputs.attn.max_seq_len = c  # the context bucket; the padding requests read one token
            graphs.replay(plan, inputs.attn)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # what remains reserved is the graphs' memory pool
        graphs.closed = True
        stats = {"graphs": len(graphs.graphs), "seconds": time.perf_counter() - start,
                 "memory_bytes": torch.cuda.memory_reserved(self.device) - reserved}  # fmt: skip
        logger.info("captured %d CUDA graphs in %.1f s, %.2f GiB", stats["graphs"], stats["seconds"],
                    stats["memory_bytes"] / 2**30)  # fmt: skip
        return stats

    def _groups(self, rounds: int) -> tuple[ExpertGroup, ...]:
        """The groups of local experts of SBO in `rounds` rounds (none for 1)."""
        return expert_rounds(self.config.model.num_experts // self.config.parallel.ep_size, rounds)

    def shutdown(self) -> None:
        """Releases the CUDA graphs (a graph holding NCCL work can hang the process group's destruction) and
        stops the microbatch threads; call before destroying the process groups."""
        if self.graphs is not None:
            self.graphs.clear()
        if self.ubatched is not None:
            self.ubatched.runtime.close()

    def prepare_inputs(
        self, batch: SchedulerOutput, num_padded_tokens: int = 0, pad_requests: int = 0,
        packed: GraphStep | None = None, min_rows: int = 0,
    ) -> StepInputs:  # fmt: skip
        """Packs the batch; pads to num_padded_tokens with tokens that belong to no request (they write their
        KV to the reserved block and their outputs are ignored). With pad_requests = t, the padding tokens form
        requests of t tokens (the last maybe fewer) that read only the reserved block: one-token requests in
        decode graphs, two-token ones in the compile warm-up's prefill steps. With `packed` (a prefill graph
        step), the padding tokens belong to no request, the request rows are padded with empty requests to
        request_rows(), and the metadata takes the packed attention layout bounded by the graph's tokens. At least
        min_rows request rows (empty ones past the batch's)."""
        ids, positions, slots, starts, seq_lens, sample_rows = [], [], [], [0], [], []
        num_padded_tokens = packed.tokens if packed else num_padded_tokens
        pad = max(0, num_padded_tokens - batch.num_tokens)
        rows = len(batch.scheduled) + (-(-pad // pad_requests) if pad_requests else 0)
        rows = max(rows, self.request_rows(len(batch.scheduled)) if packed else 0, min_rows)
        bs = self.block_size
        widths = [len(s.request.block_ids) for s in batch.scheduled]
        width = max(max(widths, default=0), int(self.table_widths[:rows].max(initial=0)))
        table = np.zeros((rows, width), dtype=np.int32)  # numpy: cheap row writes from lists
        self.table_widths[:rows] = 0
        self.table_widths[: len(widths)] = widths
        pending = []
        for i, s in enumerate(batch.scheduled):
            req, lo = s.request, s.request.num_computed_tokens
            hi = lo + s.num_new_tokens
            if req.num_pending:  # its last token is still on the device (asynchronous scheduling)
                pending.append((len(ids) + req.num_tokens - 1 - lo, req.request_id))
            ids += req.token_ids(lo, hi)
            positions += range(lo, hi)
            slots += [req.block_ids[p // bs] * bs + p % bs for p in range(lo, hi)]
            starts.append(starts[-1] + s.num_new_tokens)
            seq_lens.append(hi)
            table[i, : len(req.block_ids)] = req.block_ids
            if s.completes_prefill:
                sample_rows.append(starts[-1] - 1)
        ids, positions, slots = ids + [0] * pad, positions + [0] * pad, slots + [PADDING_SLOT] * pad
        for first in range(0, pad, pad_requests) if pad_requests else ():
            seq_lens.append(min(pad_requests, pad - first))
            starts.append(starts[-1] + seq_lens[-1])
        seq_lens += [0] * (rows - len(seq_lens))
        starts += [starts[-1]] * (rows + 1 - len(starts))
        inputs = self._fill(ids, positions, slots, starts, seq_lens, torch.from_numpy(table), sample_rows)
        inputs.pending = pending
        if packed:
            inputs.attn.decode_only, inputs.attn.context_bound = False, packed.context
        return inputs

    def request_rows(self, num_reqs: int) -> int:
        """The request rows of a prefill graph: a power of 4, at least num_reqs, at most max_num_seqs. Powers of
        4 keep the graphs few (5 row counts up to 256); empty rows cost the attention kernel little."""
        return min(self.config.scheduler.max_num_seqs, 4 ** -(-max(num_reqs - 1, 0).bit_length() // 2))

    def _fill(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        starts: list[int],
        seq_lens: list[int],
        table: torch.Tensor,
        sample_rows: list[int],
    ) -> StepInputs:
        b, n, r = self.buffers, len(ids), len(seq_lens)

        def put(dst: torch.Tensor, values: list[int]) -> torch.Tensor:
            view = dst[: len(values)]
            view.copy_(torch.tensor(values, dtype=dst.dtype), non_blocking=True)
            return view

        def put_columns(dst: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
            """values [rows, w] into dst's first w columns: returns all columns of those rows (the rest are 0)."""
            if values.numel():
                dst[: values.shape[0], : values.shape[1]].copy_(values, non_blocking=True)
            return dst[: values.shape[0]]

        attn = AttentionMetadata(
            query_start_loc=put(b.query_start_loc, starts),
            seq_lens=put(b.seq_lens, seq_lens),
            block_tables=put_columns(b.block_tables, table),
            slot_mapping=put(b.slot_mapping, slots),
            block_size=self.block_size,
            decode_only=r > 0 and starts[-1] == r,
            max_seq_len=max(seq_lens, default=0),
        )
        assert attn.num_reqs == r and attn.num_tokens == n
        return StepInputs(put(b.input_ids, ids), put(b.positions, positions), attn, put(b.logits_indices, sample_rows),
                          starts)  # fmt: skip

    @torch.inference_mode()
    def execute_model(self, plan: StepPlan, sampled: SampledTokens | None = None) -> ModelRunnerOutput:
        """Runs one planned step: float32 logits [num_sampled, vocab] in scheduling order, and the prompt
        logprobs of requests that ask for them (computed only then). The batch is padded as planned (an empty
        batch runs padding: the dummy batch of a DP rank without work, so the EP collectives still match), then
        replayed as the planned CUDA graph, or run eagerly where there is none (the packed prefill layout too,
        as on CPU). Under asynchronous scheduling, `sampled` holds the tokens the step before sampled, still on
        the device: the requests whose last token is one of them read it from there."""
        inputs = self.prepare_inputs(plan.batch, plan.num_tokens, plan.pad_requests, plan.packed)
        if inputs.pending:  # the tokens the step before sampled, from the device into this step's inputs
            rows, dst = [sampled.rows[rid] for _, rid in inputs.pending], [at for at, _ in inputs.pending]
            index = torch.tensor([dst, rows], dtype=torch.int64).to(self.device, non_blocking=True)
            inputs.input_ids[index[0]] = sampled.tokens[index[1]]
        hidden = self.graphs.replay(plan, inputs.attn) if plan.graph is not None and self.graphs else None
        hidden = self.forward(inputs, plan) if hidden is None else hidden
        out = ModelRunnerOutput(self.model.compute_logits(hidden[inputs.logits_indices]))
        if any(s.request.prompt_logprobs is not None for s in plan.batch.scheduled):
            out.prompt_logprobs = self._prompt_logprobs(plan.batch, hidden)
        return out

    def _prompt_logprobs(self, batch: SchedulerOutput, hidden: torch.Tensor) -> dict[str, LogprobsTensors]:
        """Log-softmax of the logits at every prompt position that scores a prompt token, in chunks of rows."""
        rows, targets, counts, start = [], [], {}, 0
        for s in batch.scheduled:
            positions = s.prompt_logprob_positions
            rows += [start + p - s.request.num_computed_tokens for p in positions]
            targets += [s.request.prompt_token_ids[p + 1] for p in positions]
            counts[s.request.request_id] = len(positions)
            start += s.num_new_tokens
        k = max(s.request.sampling_params.prompt_logprobs or 0 for s in batch.scheduled)
        row_ids = torch.tensor(rows, dtype=torch.int64, device=self.device)
        token_ids = torch.tensor(targets, dtype=torch.int64, device=self.device)
        parts = [
            compute_logprobs(self.model.compute_logits(hidden[row_ids[i : i + PROMPT_LOGITS_CHUNK]]),
                             token_ids[i : i + PROMPT_LOGITS_CHUNK], k)
            for i in range(0, len(rows), PROMPT_LOGITS_CHUNK)
        ]  # fmt: skip
        merged = LogprobsTensors.cat(parts) if parts else None
        out, at = {}, 0
        for request_id, n in counts.items():
            if n:
                out[request_id] = merged[at : at + n]
                at += n
        return out


def graph_capturable(config: EngineConfig) -> bool:
    """A step can be a CUDA graph only if nothing in it waits for the host: batched or Triton attention,
    grouped-GEMM experts in bfloat16 (other dtypes take a torch fallback that copies from the host) or Triton
    experts in any dtype (grids sized from shapes alone), and an all-to-all backend that is graph_capturable."""
    grouped_mm = config.moe_backend == "grouped_mm" and config.dtype == torch.bfloat16
    return (
        config.attention_backend in ("batched", "triton")
        and (grouped_mm or config.moe_backend == "triton")
        and BACKENDS[config.parallel.all2all_backend].graph_capturable
    )


def graph_buckets(config: EngineConfig) -> GraphBuckets:
    sched = config.scheduler
    rows = min(sched.max_num_seqs, sched.max_num_batched_tokens)
    return GraphBuckets(rows, sched.max_model_len, sched.max_num_batched_tokens)


def _make_all2all(config: EngineConfig, parallel: ParallelState) -> All2AllBackend | None:
    """The process's one all-to-all backend, shared by every MoE layer; None without expert parallelism."""
    if parallel.ep_group is None:
        return None
    return make_all2all(config.parallel.all2all_backend, parallel.ep_group, config.model.num_experts)


def _build_model(config: EngineConfig, parallel: ParallelState, all2all: All2AllBackend | None) -> CausalLM:
    """The model with its KV cache, its kernels, and (where the layers have no host loops, so there is something
    to compile) torch.compile of its layers."""
    sched, cache = config.scheduler, config.cache
    options = ModelOptions(
        max_positions=max(sched.max_model_len, config.model.max_position_embeddings),
        placement=ExpertPlacement(parallel.ep_rank, parallel.ep_size, all2all),
        attention_backend=config.attention_backend,
        moe_backend=config.moe_backend,
        kv_cache_blocks=(cache.num_blocks, cache.block_size),
        compile=config.compilation_level > 0 and graph_capturable(config),
    )
    model = build_model(config.model, options, config.dtype, config.device, config.model_path,
                        config.load_format, config.seed)  # fmt: skip
    if parallel.ep_size > 1:
        experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
        mib, size = experts / 2**20, parallel.ep_size
        logger.info("EP rank %d/%d holds %.1f MiB of routed experts (1/%d of %.1f MiB)", parallel.ep_rank, size,
                    mib, size, size * mib)  # fmt: skip
    return model
