"""BlockManager and Scheduler driven without a model, then the engine on a tiny checkpoint under KV pressure.

The model-free simulation stands in for the engine: a request that completes its prefill samples one fake
token, and it finishes once it has max_tokens of them. After every step the block accounting is checked
against the requests' own state, so a leak, a double free or a short block table fails at the step it happens.
"""

import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from twinbatch import LLM, SamplingParams
from twinbatch.config import SchedulerConfig
from twinbatch.core.block_manager import BlockManager
from twinbatch.core.request import Request, RequestStatus
from twinbatch.core.scheduler import Scheduler, SchedulerOutput
from twinbatch.engine.llm_engine import LLMEngine


def make_request(rid: str, prompt_len: int, max_tokens: int = 4) -> Request:
    return Request(rid, None, list(range(2, 2 + prompt_len)), SamplingParams(max_tokens=max_tokens))


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    max_model_len: int = 64,
) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens, max_model_len, max_num_seqs)
    return Scheduler(config, BlockManager(num_blocks, block_size))


def check_blocks(sched: Scheduler, out: SchedulerOutput) -> None:
    """Every usable block is either free or held by exactly one running request, whose table covers exactly
    the tokens computed after this step; waiting requests hold nothing."""
    bm = sched.block_manager
    new = {id(s.request): s.num_new_tokens for s in out.scheduled}
    held = [b for r in sched.running for b in r.block_ids]
    assert len(held) == len(set(held)) and len(bm.free_blocks) == len(set(bm.free_blocks))
    assert sorted(held + list(bm.free_blocks)) == list(range(1, bm.num_usable_blocks + 1))
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert len(r.block_ids) == math.ceil((r.num_computed_tokens + new.get(id(r), 0)) / bm.block_size)
    for r in sched.waiting:
        assert r.status == RequestStatus.WAITING and r.block_ids == [] and r.num_computed_tokens == 0


@dataclass
class Step:
    """What one step scheduled, captured before update_after_step changes the requests."""

    scheduled: list[tuple[str, int, bool]]  # (request_id, num_new_tokens, completes_prefill)
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n, _ in self.scheduled)


def step(sched: Scheduler, samples: dict[str, int] | None = None) -> Step:
    """One engine step without a model; checks the step's limits, that no running decode waits for a prefill, and
    the block accounting."""
    decoding = {r.request_id for r in sched.running if r.num_uncomputed_tokens == 1}
    out = sched.schedule()
    assert decoding <= {s.request.request_id for s in out.scheduled} | {r.request_id for r in out.preempted}
    config = sched.config
    assert out.num_tokens <= config.max_num_batched_tokens
    assert len(sched.running) <= config.max_num_seqs
    assert all(0 < s.num_new_tokens <= s.request.num_uncomputed_tokens for s in out.scheduled)
    assert not {id(r) for r in out.preempted} & {id(s.request) for s in out.scheduled}  # not re-admitted at once
    check_blocks(sched, out)
    record = Step([(s.request.request_id, s.num_new_tokens, s.completes_prefill) for s in out.scheduled], out.preempted)
    sampled = [s.request for s in out.scheduled if s.completes_prefill]
    sched.update_after_step(out)
    for req in sampled:
        assert req.num_computed_tokens == req.num_tokens
        req.output_token_ids.append(1000 + len(req.output_token_ids))
        if samples is not None:
            samples[req.request_id] = samples.get(req.request_id, 0) + 1
        if len(req.output_token_ids) == req.sampling_params.max_tokens:
            sched.finish(req, "length")
    return record


def run_to_completion(sched: Scheduler, reqs: list[Request], max_steps: int = 10_000) -> list[Step]:
    """Steps until every request has finished; each is sampled exactly max_tokens times, preempted or not."""
    samples = {r.request_id: len(r.output_token_ids) for r in reqs}  # sampled before this call
    steps = []
    while sched.has_unfinished_requests():
        steps.append(step(sched, samples))
        assert steps[-1].scheduled, "no progress while requests are unfinished"
        assert len(steps) < max_steps
    for r in reqs:
        assert r.finish_reason == "length" and r.is_finished and r.block_ids == []
        assert samples[r.request_id] == len(r.output_token_ids) == r.sampling_params.max_tokens
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_usable_blocks
    return steps


@pytest.mark.parametrize(("num_tokens", "num_blocks"), [(1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3), (16, 4)])
def test_blocks_cover_tokens_in_one_allocation(num_tokens: int, num_blocks: int) -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", num_tokens)
    assert bm.blocks_needed(req, num_tokens) == num_blocks
    bm.allocate(req, num_tokens)
    assert len(req.block_ids) == num_blocks and 0 not in req.block_ids
    assert bm.num_free_blocks == 7 - num_blocks


def test_blocks_grow_one_token_at_a_time() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    req = make_request("a", 13)
    for k in range(1, 14):
        bm.allocate(req, 1)
        req.num_computed_tokens += 1
        assert len(req.block_ids) == math.ceil(k / 4), f"after {k} tokens"
    assert len(set(req.block_ids)) == 4 and 0 not in req.block_ids
    bm.free(req)
    assert req.block_ids == [] and sorted(bm.free_blocks) == list(range(1, 8))


def test_can_allocate_counts_free_blocks() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)  # blocks 1 and 2 usable
    assert bm.num_usable_blocks == bm.num_free_blocks == 2
    assert bm.can_allocate(make_request("a", 8), 8)
    assert not bm.can_allocate(make_request("b", 9), 9)


def test_chunked_prefill_schedule() -> None:
    """Budget 8: A's 10-token prompt takes two steps; B joins with the leftover budget; both then decode."""
    sched = make_scheduler(max_num_batched_tokens=8)
    a, b = make_request("A", 10, max_tokens=3), make_request("B", 7, max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    outs = run_to_completion(sched, [a, b])
    assert [o.scheduled for o in outs] == [
        [("A", 8, False)],
        [("A", 2, True), ("B", 6, False)],
        [("A", 1, True), ("B", 1, True)],
        [("A", 1, True), ("B", 1, True)],
    ]


@pytest.mark.parametrize("budget", [1, 5, 16, 64])
def test_chunked_prefill_fills_the_token_budget(budget: int) -> None:
    """With blocks and seats to spare, every step schedules min(budget, all uncomputed tokens)."""
    rng = random.Random(budget)
    sched = make_scheduler(num_blocks=256, max_num_seqs=16, max_num_batched_tokens=budget)
    reqs = [make_request(str(i), rng.randint(1, 40), rng.randint(1, 6)) for i in range(10)]
    for r in reqs:
        sched.add_request(r)
    samples: dict[str, int] = {}
    while sched.has_unfinished_requests():
        pending = sum(r.num_uncomputed_tokens for r in reqs if not r.is_finished)
        assert step(sched, samples).num_tokens == min(budget, pending)
    assert all(samples[r.request_id] == r.sampling_params.max_tokens for r in reqs)


def test_max_num_seqs_admits_in_arrival_order() -> None:
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    reqs = [make_request(str(i), 3 + i, max_tokens=2 + i % 3) for i in range(6)]
    for r in reqs:
        sched.add_request(r)
    outs = run_to_completion(sched, reqs)
    assert [rid for rid, _, _ in outs[0].scheduled] == ["0", "1"]
    first_step = {}
    for n, out in enumerate(outs):
        for rid, _, _ in out.scheduled:
            first_step.setdefault(rid, n)
    assert [first_step[r.request_id] for r in reqs] == sorted(first_step.values())
    assert max(len(o.scheduled) for o in outs) == 2


def test_preemption_frees_newest_and_requeues_it_first() -> None:
    sched = make_scheduler(num_blocks=5, block_size=4, max_model_len=16)  # 4 usable blocks
    a, b, c = make_request("A", 8, 3), make_request("B", 8, 3), make_request("C", 4, 2)
    for r in (a, b, c):
        sched.add_request(r)
    assert step(sched).scheduled == [("A", 8, True), ("B", 8, True)]  # C: no free block left
    out = step(sched)  # A's 9th token needs a third block: B, the newest, gives its two back
    assert out.preempted == [b] and out.scheduled == [("A", 1, True)]
    assert list(sched.waiting) == [b, c] and sched.running == [a]
    assert b.num_computed_tokens == 0 and b.block_ids == [] and b.num_preemptions == 1
    assert b.output_token_ids == [1000]  # recomputed later, not sampled again
    assert sched.block_manager.num_free_blocks == 1
    run_to_completion(sched, [a, b, c])


def test_newest_request_preempts_itself() -> None:
    sched = make_scheduler(num_blocks=5, block_size=4, max_model_len=16)
    a, b = make_request("A", 5, 4), make_request("B", 8, 4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    out = step(sched)  # A (6 tokens) fits its 2 blocks; B's 9th token needs a block and B is the newest
    assert out.preempted == [b] and out.scheduled == [("A", 1, True)]
    assert list(sched.waiting) == [b] and sched.running == [a]
    run_to_completion(sched, [a, b])


@pytest.mark.parametrize("seed", range(8))
def test_random_workloads_complete_under_kv_pressure(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = 32
    sched = make_scheduler(
        num_blocks=max_model_len // block_size + 1 + rng.randint(0, 2),  # room for one full-length request
        block_size=block_size,
        max_num_seqs=rng.randint(2, 8),
        max_num_batched_tokens=rng.randint(8, 40),
        max_model_len=max_model_len,
    )
    reqs = []
    for i in range(12):
        max_tokens = rng.randint(1, 8)
        reqs.append(make_request(str(i), rng.randint(1, max_model_len - max_tokens), max_tokens))
        sched.add_request(reqs[-1])
    outs = run_to_completion(sched, reqs)
    assert sum(len(o.preempted) for o in outs) > 0


def test_arrivals_never_hold_back_running_decodes() -> None:
    """Long prompts arrive while others decode: every step schedules every running decode first (step() checks
    it), and a running prefill takes only what budget the decodes leave."""
    rng = random.Random(7)
    sched = make_scheduler(num_blocks=256, max_num_seqs=8, max_num_batched_tokens=12, max_model_len=64)
    reqs, samples = [], {}
    for i in range(40):
        if i % 4 == 0:
            reqs.append(make_request(str(i), rng.choice([2, 3, 50]), rng.randint(2, 10)))
            sched.add_request(reqs[-1])
        out = step(sched, samples)
        decodes = sum(1 for _, n, _ in out.scheduled if n == 1)
        assert out.num_tokens <= 12 and all(n <= 12 - decodes for _, n, _ in out.scheduled if n > 1)
    run_to_completion(sched, [r for r in reqs if not r.is_finished])


def test_decodes_get_a_token_every_step_while_a_long_prompt_prefills(dsv2_dir: Path) -> None:
    """Three requests decode when a 200-token prompt arrives, budget 16 tokens a step: each of the 16 steps of its
    prefill (13 tokens each beside the 3 decodes) gives every decode its token."""
    engine = LLM(str(dsv2_dir), max_model_len=256, max_num_batched_tokens=16, max_num_seqs=8).llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    short = [engine.add_request([5 + i, 6, 7], params) for i in range(3)]
    engine.step()  # their prefills
    long = engine.add_request(list(range(2, 202)), SamplingParams(max_tokens=2, ignore_eos=True))
    steps, produced = 0, set()
    while long not in produced:
        produced = {out.request_id for out in engine.step()}
        steps += 1
        assert set(short) <= produced  # no decode waited for the prefill
    assert steps == math.ceil(200 / (16 - 3))


# Engine level: a tiny checkpoint, with a KV cache that holds one full-length request and little more.

MAX_LEN = 48


def assert_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert sorted(bm.free_blocks) == list(range(1, bm.num_usable_blocks + 1))
    assert not engine.scheduler.waiting and not engine.scheduler.running and not engine.requests


@pytest.fixture(scope="module")
def tight_llm(dsv2_dir: Path) -> LLM:
    return LLM(
        str(dsv2_dir),
        dtype="float32",
        max_model_len=MAX_LEN,
        block_size=4,
        num_gpu_blocks_override=MAX_LEN // 4 + 1,
        max_num_batched_tokens=32,
        max_num_seqs=8,
    )


def random_requests(n: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, 256) for _ in range(rng.randint(1, 30))] for _ in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 8), ignore_eos=True) for _ in prompts]
    return prompts, params


def test_generate_under_preemption(tight_llm: LLM, dsv2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """40 requests through 12 blocks: outputs equal a roomy engine's (no preemption), and nothing leaks."""
    engine = tight_llm.llm_engine
    prompts, params = random_requests(40, seed=0)
    preempted = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        preempted.extend(out.preempted)
        return out

    monkeypatch.setattr(engine.scheduler, "schedule", recording)
    outs = tight_llm.generate(prompts, params, use_tqdm=False)
    assert len(preempted) > 0
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    assert_idle(engine)
    roomy = LLM(str(dsv2_dir), dtype="float32", max_model_len=MAX_LEN, max_num_batched_tokens=2048)
    ref = roomy.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]


def test_prompt_filling_the_whole_cache(tight_llm: LLM) -> None:
    """A prompt of max_model_len - 1 tokens needs every usable block and still yields its one token."""
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    (out,) = tight_llm.generate([list(range(2, 2 + MAX_LEN - 1))], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert_idle(tight_llm.llm_engine)


def test_abort_returns_all_blocks(tight_llm: LLM) -> None:
    engine = tight_llm.llm_engine
    prompts, params = random_requests(10, seed=1)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    for _ in range(3):
        engine.step()
    assert engine.scheduler.running and engine.block_manager.num_free_blocks < engine.block_manager.num_usable_blocks
    for rid in ids:
        engine.abort_request(rid)
    assert_idle(engine)
    outs = tight_llm.generate(prompts[:3], params[:3], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params[:3]]
    assert_idle(engine)


def test_request_token_ids_span_prompt_and_output() -> None:
    """The model runner reads a step's tokens through Request.token_ids: prompt, output, and (after preemption,
    recomputing) a range across both."""
    req = Request("r", None, [1, 2, 3], SamplingParams())
    req.output_token_ids += [4, 5]
    everything = [1, 2, 3, 4, 5]
    for lo in range(6):
        for hi in range(lo, 6):
            assert req.token_ids(lo, hi) == everything[lo:hi]
