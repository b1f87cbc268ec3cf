"""Dual-batch overlap against DBO off: DP=2 EP=2 over gloo on 127.0.0.1, every backend that supports DBO."""

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import DP_MAX_TOKENS, DP_PROMPTS, LONG, greedy, record_logits, running

from twinbatch import LLM
from twinbatch.distributed.parallel_state import destroy_distributed, init_distributed
from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.engine.launcher import free_port
from twinbatch.engine.llm_engine import LLMEngine

BACKENDS = ["allgather_reducescatter", "all2all", "all2allv"]


def dbo_llm(model_dir: Path, backend: str = "all2all", n: int = 2, decode: int = 2, prefill: int = 2,
            **kwargs: object) -> LLM:  # fmt: skip
    return LLM(str(model_dir), max_model_len=128, data_parallel_size=2, enable_expert_parallel=True,
               all2all_backend=backend, enable_dbo=True, ubatch_size=n, dbo_decode_token_threshold=decode,
               dbo_prefill_token_threshold=prefill, **kwargs)  # fmt: skip


def run(llm: LLM, prompts: list, max_tokens: list[int]) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy tokens, and the DBO step counts (summed over ranks) this generate() added."""
    before = llm.get_stats()["dbo"]
    tokens = greedy(llm, prompts, max_tokens)
    after = llm.get_stats()["dbo"]
    return tokens, {k: after.get(k, 0) - before.get(k, 0) for k in after}


@pytest.fixture(scope="module")
def one_process(dsv2_dir: Path) -> LLM:
    return LLM(str(dsv2_dir), max_model_len=128)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3])
def test_dbo_on_matches_off(dsv2_dir: Path, one_process: LLM, backend: str, n: int) -> None:
    """Prefill-only (one new token), mixed (chunked prefill beside decodes) and decode-only steps, long prompts
    cut inside a request, and a run where rank 1 has no request at all."""
    llm = dbo_llm(dsv2_dir, backend, n, decode=n, prefill=n, max_num_batched_tokens=24)
    try:
        for prompts, max_tokens in ((DP_PROMPTS, [1] * 5), (DP_PROMPTS, DP_MAX_TOKENS), (LONG, [8] * 4)):
            tokens, steps = run(llm, prompts, max_tokens)
            assert tokens == greedy(one_process, prompts, max_tokens)
        # requests reach the two ranks at slightly different steps, so only the decode runs surely microbatch
        assert steps.get("microbatched", 0) > 0, steps
        tokens, steps = run(llm, LONG[:1], [6])
        assert tokens == greedy(one_process, LONG[:1], [6])
        # the idle rank's dummy batch votes no (below threshold); the busy rank sees it disagree
        assert steps.get("rank_disagreed", 0) > 0 and steps.get("microbatched", 0) == 0, steps
    finally:
        llm.shutdown()


def test_dbo_on_matches_off_with_the_batched_kernels(dsv2_dir: Path) -> None:
    """The GPU's kinds of kernels on CPU: batched decode attention, whose mixed steps (chunked prefill beside
    decodes, requests cut between microbatches) send their one-token requests to it, and grouped-GEMM experts."""
    fast = {"attention_backend": "batched", "moe_backend": "grouped_mm", "max_num_batched_tokens": 24}
    prompts, max_tokens = LONG + DP_PROMPTS[:2], [8, 6, 8, 6, 10, 4]
    off = LLM(str(dsv2_dir), max_model_len=128, data_parallel_size=2, enable_expert_parallel=True,
              all2all_backend="all2all", **fast)  # fmt: skip
    try:
        expected = greedy(off, prompts, max_tokens)
    finally:
        off.shutdown()
    llm = dbo_llm(dsv2_dir, **fast)
    try:
        tokens, steps = run(llm, prompts, max_tokens)
        assert tokens == expected
        assert steps.get("microbatched", 0) > 0, steps
    finally:
        llm.shutdown()


def test_thresholds_decide_which_steps_microbatch(dsv2_dir: Path, one_process: LLM) -> None:
    """Decode threshold 4 tokens per rank, prefill threshold 40: 3 decodes per rank stay whole, 5 split;
    prefill steps split only from 40 tokens."""
    llm = dbo_llm(dsv2_dir, decode=4, prefill=40)
    try:
        few = [[7, i + 3] for i in range(6)]  # 3 per rank: 6-token prefill, then 3-token decodes
        tokens, steps = run(llm, few, [5] * 6)
        assert tokens == greedy(one_process, few, [5] * 6)
        assert steps.get("below_threshold", 0) > 0 and steps.get("microbatched", 0) == 0, steps
        many = [[7, i + 3] * 10 for i in range(10)]  # 5 per rank: 100-token prefill, then 5-token decodes
        tokens, steps = run(llm, many, [5] * 10)
        assert tokens == greedy(one_process, many, [5] * 10)
        assert steps.get("microbatched", 0) >= 2 * 3, steps  # most of the 5 steps, counted on both ranks
    finally:
        llm.shutdown()


def test_injected_fault_ends_with_a_clear_error(dsv2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINBATCH_DBO_FAULT", "1:3")  # microbatch 1 raises at its third yield
    llm = dbo_llm(dsv2_dir)
    procs = llm.llm_engine.procs
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"microbatch 1 failed after yield 3 \(dispatch\)"):
        greedy(llm, [DP_PROMPTS[0]] * 6, [10] * 6)  # even load: the decode steps microbatch
    assert time.monotonic() - start < 60
    assert not any(running(p.pid) for p in procs.values())


def test_dbo_needs_expert_parallelism(dsv2_dir: Path) -> None:
    with pytest.raises(ValueError, match="enable-expert-parallel"):
        LLM(str(dsv2_dir), data_parallel_size=2, enable_dbo=True)


def _logits_on_and_off(rank: int, port: int, model_dir: str) -> None:
    args = EngineArgs(model=model_dir, max_model_len=128, data_parallel_size=2, enable_expert_parallel=True,
                      enable_dbo=True, dbo_decode_token_threshold=2, dbo_prefill_token_threshold=2,
                      all2all_backend="all2allv", master_port=port)  # fmt: skip
    config = args.create_engine_config()
    config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, data_parallel_rank=rank))
    state = init_distributed(config.parallel, config.device)
    off = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, overlap="off"))
    logits = [record_logits(LLMEngine(c, state), LONG[rank::2], [8, 8]) for c in (off, config)]
    assert logits[0].keys() == logits[1].keys()
    for rid in logits[0]:
        torch.testing.assert_close(logits[1][rid], logits[0][rid], atol=1e-4, rtol=0)
    destroy_distributed()


def test_logits_equal_with_dbo_on_and_off(dsv2_dir: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_logits_on_and_off, args=(free_port(), str(dsv2_dir)), nprocs=2)
