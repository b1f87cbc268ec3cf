"""The packed prefill layout that prefill CUDA graphs take (layers/attention.py `packed_attention`,
worker/graph_runner.py): every request's context gathered into one buffer of a fixed number of rows, request
rows padded with empty requests, no host reads. Where there are no graphs (CPU) it runs eagerly; it must give
what the per-request loop gives, whole and microbatched."""

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import LONG, MIXED, make_meta, packed, record_logits, run_attention

from twinbatch.config import ParallelConfig
from twinbatch.core.dp_sync import StepSync
from twinbatch.core.request import Request
from twinbatch.core.scheduler import ScheduledRequest, SchedulerOutput
from twinbatch.core.step_plan import GraphBuckets, GraphStep, StepPlan, StepPlanner, _prefill_buckets, ubatch_bounds
from twinbatch.distributed.parallel_state import destroy_distributed, init_distributed
from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.engine.launcher import free_port
from twinbatch.engine.llm_engine import LLMEngine
from twinbatch.layers.forward_context import ForwardContext
from twinbatch.sampling_params import SamplingParams
from twinbatch.worker.model_runner import ModelRunnerOutput


@pytest.mark.parametrize(("empty_rows", "spare"), [(0, 0), (3, 5)])
@pytest.mark.parametrize("pad", [0, 4])
@pytest.mark.parametrize("k", [None, 2, 3])
def test_packed_attention_equals_the_loop(empty_rows: int, spare: int, pad: int, k: int | None) -> None:
    """Decodes and prefill chunks on cached context, GQA; whole, or cut into k microbatches (each takes every
    request row, its query range cut on the device)."""
    meta = make_meta(*MIXED, pad=pad)
    bounds = ubatch_bounds(meta.num_tokens, k) if k else None
    want = run_attention(meta, None)
    got = run_attention(packed(meta, empty_rows, spare), bounds)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not got[sum(MIXED[1]) :].any()  # padding tokens get 0


@pytest.mark.parametrize("pad", [0, 4])
@pytest.mark.parametrize("k", [None, 2])
def test_split_attention_equals_the_loop(pad: int, k: int | None) -> None:
    """An eager prefill or mixed step on a fast backend: the decodes go to the decode kernel together and the
    other requests to one packed attention over their contexts (no loop), whole and microbatched."""
    meta = make_meta(*MIXED, pad=pad)
    bounds = ubatch_bounds(meta.num_tokens, k) if k else None
    want = run_attention(meta, bounds)
    got = run_attention(make_meta(*MIXED, pad=pad), bounds, split=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    decodes, prefills = meta.split
    assert sorted(decodes.requests) == [i for i, n in enumerate(MIXED[1]) if n == 1]
    assert prefills.meta.context_bound == sum(c + n for c, n in zip(*MIXED, strict=True) if n > 1)


def test_packed_attention_oracle_detects_a_short_context_bound() -> None:
    meta = make_meta(*MIXED)
    short = dataclasses.replace(packed(meta, 0, 0), context_bound=int(meta.seq_lens.sum()) - 3)
    assert not torch.allclose(run_attention(short, None), run_attention(meta, None), atol=1e-3)


class PackedPlanner(StepPlanner):
    """Every step with a prefill runs in the packed layout, its context bound the next power of two past its
    contexts: looser than the engine's rule on GPU (both within the token budget), so that chunks on long cached
    contexts take it too. Where there are no graphs (CPU) it runs eagerly."""

    def graph(self, sync: StepSync) -> GraphStep | None:
        if all(sync.decode_only):
            return None
        need = max(sync.max_tokens, *sync.context_tokens)
        return GraphStep(sync.max_tokens, prefill=True, context=1 << (need - 1).bit_length())


def packed_steps(engine: LLMEngine) -> None:
    engine.planner = PackedPlanner(engine.config.parallel)


def engine_logits(model_dir: Path, step: Callable | None, **kw: object) -> dict[str, torch.Tensor]:
    """Every sampled row's logits, by request, from one process."""
    engine = LLMEngine(EngineArgs(model=str(model_dir), max_model_len=128, **kw).create_engine_config())
    if step is not None:
        step(engine)
    rows: dict[str, list[torch.Tensor]] = {}
    execute = engine.model_runner.execute_model

    def recording(plan: StepPlan, *sampled: object) -> ModelRunnerOutput:
        out = execute(plan, *sampled)
        for s, row in zip([s for s in plan.batch.scheduled if s.completes_prefill], out.logits, strict=True):
            rows.setdefault(s.request.request_id, []).append(row.clone())
        return out

    engine.model_runner.execute_model = recording
    for p, n in zip(LONG, [6, 1, 4, 3], strict=True):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return {rid: torch.stack(r) for rid, r in rows.items()}


@pytest.mark.parametrize("model_fixture", ["dsv2_dir", "qwen3_dir"])
@pytest.mark.parametrize("budget", [24, 256])
def test_packed_prefill_steps_match_the_loop(model_fixture: str, budget: int, request: pytest.FixtureRequest) -> None:
    """One process; a budget of 24 tokens chunks the prompts (chunks on cached context, mixed steps)."""
    model_dir = request.getfixturevalue(model_fixture)
    want = engine_logits(model_dir, None, max_num_batched_tokens=budget)
    got = engine_logits(model_dir, packed_steps, max_num_batched_tokens=budget)
    assert got.keys() == want.keys()
    for rid in want:
        torch.testing.assert_close(got[rid], want[rid], atol=1e-4, rtol=0)


def _packed_under_dbo(rank: int, port: int, model_dir: str) -> None:
    args = EngineArgs(model=model_dir, max_model_len=128, data_parallel_size=2, enable_expert_parallel=True,
                      enable_dbo=True, dbo_decode_token_threshold=2, dbo_prefill_token_threshold=2,
                      all2all_backend="all2all", max_num_batched_tokens=32, master_port=port)  # fmt: skip
    config = args.create_engine_config()
    config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, data_parallel_rank=rank))
    state = init_distributed(config.parallel, config.device)
    off = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, overlap="off"))
    logits = []
    for c, step in ((off, None), (config, packed_steps)):
        engine = LLMEngine(c, state)
        if step is not None:
            step(engine)
        logits.append(record_logits(engine, LONG[rank::2], [8, 8]))
    assert logits[0].keys() == logits[1].keys()
    for rid in logits[0]:
        torch.testing.assert_close(logits[1][rid], logits[0][rid], atol=1e-4, rtol=0)
    destroy_distributed()


def test_packed_prefill_under_dbo_matches_dbo_off(dsv2_dir: Path) -> None:
    """DP=2 EP=2 over gloo: packed prefill steps cut into microbatches against the loop with DBO off."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_packed_under_dbo, args=(free_port(), str(dsv2_dir)), nprocs=2)


def test_an_idle_rank_dummy_step_in_the_packed_layout(dsv2_dir: Path) -> None:
    """A DP rank with nothing to do runs the step's padding tokens in the packed layout with no request at all
    but one empty row: its attention reads nothing and gives zeros, never NaN from an empty softmax."""
    engine = LLMEngine(EngineArgs(model=str(dsv2_dir), max_model_len=128).create_engine_config())
    runner = engine.model_runner
    inputs = runner.prepare_inputs(SchedulerOutput(), packed=GraphStep(16, prefill=True, context=16))
    assert (inputs.attn.num_reqs, inputs.attn.num_tokens, inputs.attn.context_bound) == (1, 16, 16)
    assert inputs.attn.seq_lens.tolist() == [0] and inputs.attn.query_start_loc.tolist() == [0, 0]
    with torch.inference_mode():
        hidden = runner.model(inputs.input_ids, inputs.positions, ForwardContext(inputs.attn, 16))
    assert hidden.shape == (16, runner.model.config.hidden_size) and hidden.isfinite().all()
    assert runner.request_rows(0) == 1 and runner.request_rows(2) == 4 and runner.request_rows(17) == 64


def test_block_tables_copy_only_the_columns_in_use(dsv2_dir: Path) -> None:
    """A step copies the block-table columns its requests use (not max_model_len / block_size a row), zeroing
    what an earlier, longer step left: the rows read the same as a full table built from scratch each step."""
    engine = LLMEngine(EngineArgs(model=str(dsv2_dir), max_model_len=128, block_size=4).create_engine_config())
    runner = engine.model_runner

    def decodes(*blocks: list[int]) -> SchedulerOutput:
        reqs = [Request(f"r{i}", None, [1] * (4 * len(b)), SamplingParams(), num_computed_tokens=4 * len(b) - 1,
                        block_ids=b) for i, b in enumerate(blocks)]  # fmt: skip
        return SchedulerOutput([ScheduledRequest(r, 1) for r in reqs])

    for blocks in ([[5, 6, 7, 8, 9], [3]], [[2], [1, 4]], [[7], [3], [9, 10, 11]], [[1]], [[1], [2], [3]]):
        table = runner.prepare_inputs(decodes(*blocks)).attn.block_tables
        want = torch.zeros(len(blocks), runner.max_blocks_per_req, dtype=torch.int32)
        for row, b in zip(want, blocks, strict=True):
            row[: len(b)] = torch.tensor(b)
        assert torch.equal(table.cpu(), want), blocks  # the last step's rows 1 and 2 held [3], [9, 10, 11] before


def test_prefill_buckets() -> None:
    assert _prefill_buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 1536, 2048]
    assert _prefill_buckets(300) == [16, 32, 64, 128, 256, 300]
    assert _prefill_buckets(1100) == [16, 32, 64, 128, 256, 512, 1024, 1100]


@pytest.mark.parametrize(
    ("overlap", "labels"),
    [("off", ["off"]), ("dbo", ["off", "dbo"]), ("sbo", ["sbo2"]), ("auto", ["off", "dbo", "sbo2"])],
)
def test_graphs_captured_at_start_up(overlap: str, labels: list[str]) -> None:
    """The set the engine captures before serving (8 decode rows, max_model_len 600, a 64-token budget, rows
    capped at 8): decode graphs at every batch and context bucket, prefill graphs at 1, 4, 16, ... rows up to
    what a bucket holds; DBO's only where each of 2 microbatches gets a token; each mode a step may run."""
    parallel = ParallelConfig(data_parallel_size=2, enable_expert_parallel=True, overlap=overlap)
    planner = StepPlanner(parallel, GraphBuckets(8, 600, 64))
    assert planner.graph_labels() == labels
    keys = planner.buckets.keys(labels, lambda tokens: min(8, tokens), parallel.ubatch_size)
    decode = [("decode", b, c) for b in (1, 2, 4, 8) for c in (256, 512, 600)]
    prefill = [("prefill", t, r) for t in (16, 32, 64) for r in (1, 4, 8)]
    assert keys == [(*step, label) for step in decode + prefill for label in labels
                    if label != "dbo" or step[1] >= 2]  # fmt: skip
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    ("tokens", "decode_only", "context", "want"),
    [
        ([5, 3], [True, True], [900, 500], GraphStep(8)),  # decodes: a decode graph, whatever their contexts
        ([40, 1], [False, True], [40, 30], GraphStep(64, prefill=True, context=64)),  # contexts fit: a prefill graph
        ([40, 0], [False, True], [40, 0], GraphStep(64, prefill=True, context=64)),  # an idle rank joins it
        ([40, 1], [False, True], [40, 900], None),  # a rank's contexts past the budget: eager
        ([300, 300], [True, True], [300, 300], GraphStep(512, prefill=True, context=512)),  # past the decode buckets
    ],
)
def test_engine_graph_rule(tokens: list[int], decode_only: list[bool], context: list[int],
                           want: GraphStep | None) -> None:  # fmt: skip
    """The rule every DP rank applies to the same synced numbers (budget 512 tokens, 256 decode rows)."""
    planner = StepPlanner(ParallelConfig(), GraphBuckets(256, 4096, 512))
    sync = StepSync(tokens, [False] * 2, decode_only, context, False)
    assert planner.graph(sync) == want
