"""Asynchronous scheduling (each step scheduled and launched before the step before's tokens are read) against
synchronous scheduling, the oracle: the same outputs, token for token, logprob for logprob."""

from pathlib import Path

import pytest
from helpers import DP_MAX_TOKENS, DP_PROMPTS, LONG, greedy

from twinbatch import LLM, SamplingParams
from twinbatch.outputs import RequestOutput


def run(llm: LLM, prompts: list, params: list[SamplingParams]) -> list[tuple]:
    """Everything a request's output says, per prompt."""

    def fields(o: RequestOutput) -> tuple:
        c = o.outputs[0]
        return c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs, o.prompt_logprobs

    return [fields(o) for o in llm.generate(prompts, params, use_tqdm=False)]


def both(model: str | None, **kwargs: object) -> tuple[LLM, LLM]:
    return LLM(model, async_scheduling=False, **kwargs), LLM(model, async_scheduling=True, **kwargs)


@pytest.mark.parametrize("model_fixture", ["dsv2_dir", "dsv3_dir", "qwen3_dir"])
def test_same_outputs_under_chunked_prefill_and_preemption(model_fixture: str, request: pytest.FixtureRequest) -> None:
    """Greedy with sample and prompt logprobs, seeded random sampling, max_tokens, and a stop token that ends a
    request in the middle (async scheduling had scheduled it once more): a 16-token budget cuts the prompts into
    chunks, and 16 KV blocks of 4 make requests preempt each other."""
    model = str(request.getfixturevalue(model_fixture))
    sync_llm, async_llm = both(model, max_model_len=64, max_num_batched_tokens=16, block_size=4,
                               num_gpu_blocks_override=17, max_num_seqs=4)  # fmt: skip
    prompts = [p[:40] for p in LONG] + [[5, 17, 42, 7, 99], [9, 8]]
    greedy_lp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, ignore_eos=True, seed=7)
    params = [greedy_lp, seeded, greedy_lp, seeded, greedy_lp, SamplingParams(temperature=0.0, max_tokens=3)]
    expected = run(sync_llm, prompts, params)
    stop_token = expected[4][0][5]  # request 4 stops at its 6th token
    params[4] = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_token])
    expected = run(sync_llm, prompts, params)
    assert expected[4][2] == "stop" and len(expected[4][0]) <= 6
    assert run(async_llm, prompts, params) == expected
    assert async_llm.get_stats()["num_preemptions"] > 0
    engine = async_llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks and not engine.requests


def test_same_text_with_stop_strings_that_straddle_tokens() -> None:
    """The built-in model's tokenizer: stop strings cut out of the synchronous run's text across token bounds."""
    sync_llm, async_llm = both(None, max_model_len=128)
    prompts = ["The capital of France is", "Hello, my name is", "1, 2, 3,"]
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    texts = [o.outputs[0].text for o in sync_llm.generate(prompts, plain, use_tqdm=False)]
    params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[t[5:9]]) for t in texts]
    expected = run(sync_llm, prompts, params)
    assert all(o[2] == "stop" for o in expected)
    assert run(async_llm, prompts, params) == expected


def test_tokens_arrive_a_step_later_and_nothing_is_computed_twice(dsv2_dir: Path) -> None:
    """A step's tokens come with the next call; a request that reaches max_tokens is not scheduled again, so both
    modes run the same model steps."""
    sync_llm, async_llm = both(str(dsv2_dir), max_model_len=64)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for llm, lag in ((sync_llm, 0), (async_llm, 1)):
        engine = llm.llm_engine
        engine.add_request([5, 6, 7, 8], params)
        produced = [len(out.outputs[0].token_ids) for _ in range(3 + lag) for out in engine.step()]
        assert produced == [1, 2, 3] and not engine.has_unfinished_requests()
        assert llm.get_stats()["step_seconds"]["count"] == 3  # model steps: the prefill and two decodes


def test_aborts_mid_flight_free_every_block(dsv2_dir: Path) -> None:
    llm = LLM(str(dsv2_dir), max_model_len=64, async_scheduling=True)
    engine = llm.llm_engine
    ids = [engine.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True)) for p in LONG]
    for _ in range(4):
        engine.step()
    assert engine.in_flight is not None and engine.scheduler.running
    for rid in ids:
        engine.abort_request(rid)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs == []  # the step in flight gives an aborted request nothing
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks and not engine.requests
    assert llm.get_stats()["num_aborted"] == len(ids)


def test_dp2_ep2_with_dbo_matches_one_synchronous_process(dsv2_dir: Path) -> None:
    one = LLM(str(dsv2_dir), max_model_len=128, async_scheduling=False)
    llm = LLM(str(dsv2_dir), max_model_len=128, data_parallel_size=2, enable_expert_parallel=True, enable_dbo=True,
              dbo_decode_token_threshold=2, dbo_prefill_token_threshold=2, max_num_batched_tokens=24,
              async_scheduling=True)  # fmt: skip
    try:
        for prompts, max_tokens in ((DP_PROMPTS, DP_MAX_TOKENS), (LONG, [8] * 4)):
            assert greedy(llm, prompts, max_tokens) == greedy(one, prompts, max_tokens)
        assert llm.get_stats()["dbo"].get("microbatched", 0) > 0
    finally:
        llm.shutdown()
