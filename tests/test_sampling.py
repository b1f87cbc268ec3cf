"""Sampling (greedy, temperature, top-k, top-p, seeds) and stop conditions (eos, stop ids, stop strings, length)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from twinbatch import LLM, SamplingParams
from twinbatch.layers.sampler import sample

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
DRAWS = 20_000


def frequencies(params: SamplingParams, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = sample(LOGITS.expand(DRAWS, -1), [params] * DRAWS, [None] * DRAWS, gen)
    return torch.bincount(tokens, minlength=LOGITS.numel()).float() / DRAWS


def test_temperature_sampling_follows_softmax() -> None:
    for temperature in (0.5, 1.0, 2.0):
        expected = (LOGITS / temperature).softmax(-1)
        torch.testing.assert_close(frequencies(SamplingParams(temperature=temperature)), expected, atol=0.015, rtol=0)


def test_top_k_keeps_the_k_best() -> None:
    freq = frequencies(SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(freq, torch.cat([LOGITS[:2].softmax(-1), torch.zeros(4)]), atol=0.015, rtol=0)


def test_top_p_keeps_the_nucleus() -> None:
    probs = LOGITS.softmax(-1)  # [0.61, 0.22, 0.14, ...]: 0.8 needs the first three
    freq = frequencies(SamplingParams(temperature=1.0, top_p=0.8))
    expected = torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(3)])
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_each_row_follows_its_own_parameters() -> None:
    """One batch mixing greedy rows, temperatures, top-k (past the vocabulary too) and top-p: sampled together,
    each row still draws from its own distribution."""
    kinds = [SamplingParams(temperature=0.5), SamplingParams(temperature=1.0, top_k=2),
             SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.0),
             SamplingParams(temperature=2.0, top_k=100)]  # fmt: skip
    n = DRAWS // 2
    tokens = sample(LOGITS.expand(n * len(kinds), -1), kinds * n, [None] * (n * len(kinds)), torch.Generator())
    probs = LOGITS.softmax(-1)
    expected = [
        (LOGITS / 0.5).softmax(-1),
        torch.cat([LOGITS[:2].softmax(-1), torch.zeros(4)]),
        torch.cat([probs[:3] / probs[:3].sum(), torch.zeros(3)]),
        torch.eye(6)[0],
        (LOGITS / 2).softmax(-1),
    ]
    for k, want in enumerate(expected):
        freq = torch.bincount(tokens[k :: len(kinds)], minlength=LOGITS.numel()).float() / n
        torch.testing.assert_close(freq, want, atol=0.02, rtol=0)


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    tokens = sample(logits, [SamplingParams(temperature=0.0)] * 4, [None] * 4, torch.Generator())
    assert tokens.tolist() == logits.argmax(-1).tolist()


def generate(llm: LLM, prompts: list, **params: object) -> list:
    return [o.outputs[0] for o in llm.generate(prompts, SamplingParams(**params), use_tqdm=False)]


PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,"]


def test_seed_makes_sampling_reproducible(builtin_llm: LLM) -> None:
    a = generate(builtin_llm, PROMPTS, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    b = generate(builtin_llm, PROMPTS[::-1], temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)[::-1]
    c = generate(builtin_llm, PROMPTS, temperature=1.0, seed=8, max_tokens=12, ignore_eos=True)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]  # independent of batch order
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_top_k_one_and_tiny_top_p_are_greedy(builtin_llm: LLM) -> None:
    greedy = generate(builtin_llm, PROMPTS, temperature=0.0, max_tokens=8, ignore_eos=True)
    top_k = generate(builtin_llm, PROMPTS, temperature=1.0, top_k=1, seed=3, max_tokens=8, ignore_eos=True)
    top_p = generate(builtin_llm, PROMPTS, temperature=1.0, top_p=1e-6, seed=3, max_tokens=8, ignore_eos=True)
    assert [g.token_ids for g in greedy] == [k.token_ids for k in top_k] == [p.token_ids for p in top_p]


def test_max_tokens_ends_with_length(builtin_llm: LLM) -> None:
    out = generate(builtin_llm, PROMPTS, temperature=0.0, max_tokens=5, ignore_eos=True)
    assert all(len(o.token_ids) == 5 and o.finish_reason == "length" for o in out)


def test_stop_token_ids(builtin_llm: LLM) -> None:
    full = generate(builtin_llm, PROMPTS[:1], temperature=0.0, max_tokens=20, ignore_eos=True)[0].token_ids
    stop = full[6]
    out = generate(builtin_llm, PROMPTS[:1], temperature=0.0, max_tokens=20, stop_token_ids=[stop])[0]
    assert out.token_ids == full[: full.index(stop) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_stop_string_truncates_text(builtin_llm: LLM) -> None:
    full = generate(builtin_llm, PROMPTS[:1], temperature=0.0, max_tokens=24, ignore_eos=True)[0]
    stop = full.text[len(full.text) // 2 :][:3]  # a piece from the middle of the output
    assert stop.strip(), full.text
    out = generate(builtin_llm, PROMPTS[:1], temperature=0.0, max_tokens=24, stop=[stop], ignore_eos=True)[0]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)
    assert out.text == full.text[: full.text.find(stop)]
    assert len(out.token_ids) < len(full.token_ids)


def test_eos_stops_unless_ignored(dsv2_dir: Path, tmp_path: Path) -> None:
    """A copy of the checkpoint whose config names the 5th greedy token as eos stops right there."""
    prompt = [[3, 14, 15, 92, 65]]
    llm = LLM(str(dsv2_dir), max_model_len=64)
    full = generate(llm, prompt, temperature=0.0, max_tokens=16, ignore_eos=True)[0].token_ids
    eos = full[4]
    model_dir = shutil.copytree(dsv2_dir, tmp_path / "eos")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    llm = LLM(str(model_dir), max_model_len=64)
    stopped = generate(llm, prompt, temperature=0.0, max_tokens=16)[0]
    assert stopped.token_ids == full[: full.index(eos) + 1] and stopped.finish_reason == "stop"
    ignored = generate(llm, prompt, temperature=0.0, max_tokens=16, ignore_eos=True)[0]
    assert ignored.token_ids == full and ignored.finish_reason == "length"


def test_generation_stops_at_max_model_len(dsv2_dir: Path) -> None:
    llm = LLM(str(dsv2_dir), max_model_len=12)
    out = generate(llm, [[5] * 9], temperature=0.0, max_tokens=100, ignore_eos=True)[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


@pytest.mark.parametrize("prompt", ["Hello", [5, 6, 7], {"prompt_token_ids": [5, 6, 7]}])
def test_prompt_forms(builtin_llm: LLM, prompt: object) -> None:
    out = builtin_llm.generate(prompt, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 3
    assert out[0].prompt_token_ids == (builtin_llm.get_tokenizer().encode("Hello") if prompt == "Hello" else [5, 6, 7])
