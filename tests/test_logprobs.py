"""Log-probabilities against Hugging Face, and incremental detokenization against decoding the whole output."""

import itertools
from pathlib import Path

import pytest
import torch
from hf_oracle import hf_logits

from twinbatch import LLM, SamplingParams
from twinbatch.core.detokenizer import IncrementalDetokenizer

PROMPTS = [[5, 17, 42, 7, 99, 3, 250, 11], list(range(30, 53)), [9]]


def check_scored(logprobs: dict, token: int, expected: torch.Tensor, k: int) -> None:
    """One position's dict: the scored token first with its log-probability and rank, then the top-k."""
    ids = list(logprobs)
    assert ids[0] == token
    assert logprobs[token].logprob == pytest.approx(float(expected[token]), abs=1e-4)
    assert logprobs[token].rank == int((expected > expected[token]).sum()) + 1
    top = expected.topk(k)
    assert set(ids) == {token, *top.indices.tolist()}
    for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True), start=1):
        assert logprobs[t].logprob == pytest.approx(v, abs=1e-4)
        assert t == token or logprobs[t].rank == rank


@pytest.mark.parametrize(
    "engine_kwargs",
    [{}, {"max_num_batched_tokens": 8, "block_size": 4}, {"num_gpu_blocks_override": 10, "block_size": 4}],
    ids=["whole", "chunked", "preempted"],
)
def test_prompt_and_sample_logprobs_match_hf(dsv2_dir: Path, engine_kwargs: dict) -> None:
    llm = LLM(str(dsv2_dir), max_model_len=32, **engine_kwargs)  # preempted: 14 blocks needed, 9 usable
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=3)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False), strict=True):
        tokens = out.outputs[0].token_ids
        expected = hf_logits(dsv2_dir, prompt + tokens).log_softmax(-1)  # [len, vocab]
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for p in range(1, len(prompt)):
            check_scored(out.prompt_logprobs[p], prompt[p], expected[p - 1], 3)
        assert len(out.outputs[0].logprobs) == len(tokens)
        for i, (token, logprobs) in enumerate(zip(tokens, out.outputs[0].logprobs, strict=True)):
            check_scored(logprobs, token, expected[len(prompt) - 1 + i], 2)
            assert logprobs[token].rank == 1  # greedy


def test_no_logprobs_unless_asked(builtin_llm: LLM) -> None:
    (out,) = builtin_llm.generate(["Hi"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert out.prompt_logprobs is None and out.outputs[0].logprobs is None


def test_logprobs_zero_gives_only_the_scored_token(builtin_llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=0, prompt_logprobs=0, ignore_eos=True)
    (out,) = builtin_llm.generate(["Hello there"], params, use_tqdm=False)
    assert all(len(d) == 1 for d in out.prompt_logprobs[1:]) and all(len(d) == 1 for d in out.outputs[0].logprobs)


def test_negative_logprobs_rejected() -> None:
    with pytest.raises(ValueError, match="logprobs must be None or an integer >= 0"):
        SamplingParams(logprobs=-1)


@pytest.fixture(scope="module")
def tokenizer(builtin_llm: LLM) -> object:
    return builtin_llm.get_tokenizer()


@pytest.mark.parametrize("method", ["decode_stream", "window"])
def test_incremental_text_equals_decoding_everything(tokenizer: object, method: str) -> None:
    ids = tokenizer.encode("Grüße, 世界! naïve café 🙂 done")
    detok = IncrementalDetokenizer(tokenizer, True, [])
    assert detok.stream is not None  # the built-in tokenizer is a fast one
    if method == "window":
        detok.stream = None
    seen = []
    for t in ids:
        detok.add_token(t)
        seen.append(detok.final_text(finished=False))
    assert detok.text == tokenizer.decode(ids)
    assert all(b.startswith(a) for a, b in itertools.pairwise(seen))  # committed text never changes
    assert all("\ufffd" not in s for s in seen)


def test_stop_string_is_held_back_and_cut(tokenizer: object) -> None:
    ids = tokenizer.encode("one two three four")  # " three" and " four" are one token each
    detok = IncrementalDetokenizer(tokenizer, True, ["ree fo", "xx"])  # spans two tokens
    running = []
    for t in ids:
        if (stop := detok.add_token(t)) is not None:
            break
        running.append(detok.final_text(finished=False))
    assert stop == "ree fo" and detok.text == "one two th"
    assert all(detok.text.startswith(r) for r in running)  # nothing streamed was taken back
