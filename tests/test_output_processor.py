"""Detokenization in the front end (engine/output_processor.py): the engine processes send token ids and the
front end makes the text and ends requests on stop strings. The oracle: one in-process engine that detokenizes
itself (LLMEngine with detokenize=True, as the offline LLM runs it)."""

import time

import pytest

from twinbatch import SamplingParams
from twinbatch.config import EngineConfig
from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.engine.dp_client import DPEngineClient
from twinbatch.engine.llm_engine import LLMEngine
from twinbatch.engine.output_processor import OutputProcessor
from twinbatch.outputs import RequestOutput

PROMPTS = ["The capital of France is", "Hello, my name is", "1, 2, 3,"]


def config() -> EngineConfig:
    return EngineArgs(max_model_len=128, async_scheduling=False).create_engine_config()


def fields(o: RequestOutput) -> tuple:
    c = o.outputs[0]
    return c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs


def run(engine: LLMEngine | DPEngineClient, prompts: list[str], params: list[SamplingParams]) -> list[RequestOutput]:
    """Every request's last output, in prompt order, from an LLMEngine or a DPEngineClient."""
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params, strict=True)]
    done: dict[str, RequestOutput] = {}
    while len(done) < len(ids):
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return [done[i] for i in ids]


def stop_params(oracle: LLMEngine, max_tokens: int = 16) -> list[SamplingParams]:
    """Stop strings cut out of the greedy text of 16 tokens across token bounds, with logprobs; the last request
    also stops on the token id that completes its stop string, whose reason wins."""
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = run(oracle, PROMPTS, [plain] * len(PROMPTS))
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2,
                             stop=[o.outputs[0].text[5:9]]) for o in outs]  # fmt: skip
    last = run(oracle, PROMPTS[-1:], params[-1:])[0].outputs[0]
    params[-1].stop_token_ids = [last.token_ids[-1]]
    return params


def test_the_front_end_makes_the_text_the_engine_would() -> None:
    oracle, ranks = LLMEngine(config()), LLMEngine(config(), detokenize=False)
    params = stop_params(oracle)
    want = [fields(o) for o in run(oracle, PROMPTS, params)]
    assert [w[2] for w in want] == ["stop"] * 3 and isinstance(want[-1][3], int) and isinstance(want[0][3], str)
    processor, got = OutputProcessor(ranks.tokenizer), {}
    ids = [ranks.add_request(p, q) for p, q in zip(PROMPTS, params, strict=True)]
    for i, q in zip(ids, params, strict=True):
        processor.add_request(i, q)
    while ranks.has_unfinished_requests():
        for out in ranks.step():
            assert out.outputs[0].text == "" and out.metrics is not None  # no text; run-time metrics to stop with
            if out.request_id not in got:
                out, stopped = processor.process(out)
                if out.finished:
                    got[out.request_id] = out
                if stopped:
                    ranks.abort_request(out.request_id)  # as the front end tells the rank
    assert [fields(got[i]) for i in ids] == want


def test_a_rank_stops_on_the_front_ends_stop_string_and_frees_its_blocks() -> None:
    """A DP=1 engine process: the outputs equal the in-process engine's, and the requests the front end ended
    on a stop string leave the rank (no request running, no KV block in use) once the abort reaches it, long
    before their max_tokens."""
    oracle = LLMEngine(config())
    params = stop_params(oracle, max_tokens=100)
    want = [fields(o) for o in run(oracle, PROMPTS, params)]
    client = DPEngineClient(config())
    try:
        got = [fields(o) for o in run(client, PROMPTS, params)]
        assert [g[:4] for g in got] == [w[:4] for w in want]
        for g, w in zip(got, want, strict=True):  # another process, other CPU threads: float sums in another order
            assert [{t: (p.logprob, p.rank) for t, p in d.items()} for d in g[4]] == [
                {t: (pytest.approx(p.logprob, abs=1e-5), p.rank) for t, p in d.items()} for d in w[4]
            ]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            client.step(timeout=0.1)
            stats = client.get_stats()["ranks"][0]
            if stats["num_running"] == 0 and stats["kv_cache_usage"] == 0:
                break
        assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0, stats
        assert stats["num_generation_tokens"] <= sum(len(w[0]) for w in want) + 3 * 8  # 300 if never stopped
        assert not client.owner and not client.text.detokenizers
    finally:
        client.shutdown()
