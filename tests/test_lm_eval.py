"""lm-evaluation-harness against `twinbatch serve`: the `local-completions` model with the server's own tokenizer
(`tokenizer_backend=remote`: GET /tokenizer_info, POST /tokenize and /detokenize), on tiny local tasks.

This checks the protocol, not the score (the built-in model has random weights): every document gets a result,
and it is the result the offline engine (same built-in weights, seed 0) gives for the same token ids:
- generate_until sends token-id prompts (a batch: a list of lists) with `stop` and `max_tokens` and reads
  `choices[i].text`: it must equal the offline greedy text;
- multiple_choice (loglikelihood) sends `echo: true, logprobs: 1, max_tokens: 1` and sums the echoed prompt's
  `token_logprobs` over the continuation: it must equal the sum of the offline engine's prompt logprobs.
lm_eval runs in a subprocess, offline (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE), reading a jsonl written here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai_server import launch_server

from twinbatch import LLM, SamplingParams

QUESTIONS = [
    {"question": "What is the capital of France?", "answer": "Paris", "choices": ["Paris", "Rome", "Oslo"], "label": 0},
    {"question": "What is 2 + 3?", "answer": "5", "choices": ["4", "5", "six"], "label": 1},
    {"question": "Which animal barks?", "answer": "dog", "choices": ["cat", "cow", "dog"], "label": 2},
    {"question": "What color is the sky?", "answer": "blue", "choices": ["blue", "green"], "label": 0},
    {"question": "How many legs has a spider?", "answer": "8", "choices": ["6", "8"], "label": 1},
]

GENERATE_TASK = """\
task: twinbatch_tiny_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHOICE_TASK = """\
task: twinbatch_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    with launch_server("--max-model-len", "512") as url:
        yield url


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "generate.yaml").write_text(GENERATE_TASK.format(data=data))
    (tmp_path / "choice.yaml").write_text(CHOICE_TASK.format(data=data))
    return tmp_path


def run_lm_eval(url: str, task: str, task_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`lm_eval run` in a subprocess; returns its results file and the logged samples."""
    out = task_dir / f"out_{task}"
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    model_args = f"model={model},base_url={url}/v1/completions,tokenizer_backend=remote,max_retries=1"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", task, "--include_path", str(task_dir), "--output_path", str(out), "--log_samples"]  # fmt: skip
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(task_dir / "hf")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"lm_eval failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples_file = next(out.rglob(f"samples_{task}_*.jsonl"))
    return results, [json.loads(line) for line in samples_file.read_text().splitlines()]


def test_lm_eval_generate_until(server_url: str, task_dir: Path, builtin_llm: LLM) -> None:
    results, samples = run_lm_eval(server_url, "twinbatch_tiny_generate", task_dir)
    assert "exact_match,none" in results["results"]["twinbatch_tiny_generate"]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(QUESTIONS)))
    # oracle: the offline engine (same built-in weights, seed 0), greedy on the same token ids, same stops
    tokenizer = builtin_llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=8, stop=["\n", tokenizer.eos_token])
    for s in samples:
        context = s["arguments"]["gen_args_0"]["arg_0"]
        (expected,) = builtin_llm.generate([tokenizer.encode(context, add_special_tokens=False)], params)
        assert s["filtered_resps"] == [expected.outputs[0].text], context


def test_lm_eval_multiple_choice(server_url: str, task_dir: Path, builtin_llm: LLM) -> None:
    results, samples = run_lm_eval(server_url, "twinbatch_tiny_choice", task_dir)
    assert "acc,none" in results["results"]["twinbatch_tiny_choice"]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(QUESTIONS)))
    for s in samples:
        scores = s["filtered_resps"]  # one [loglikelihood, is_greedy] per choice
        assert len(scores) == len(s["doc"]["choices"]) == len(s["arguments"])
        for args, (loglikelihood, is_greedy) in zip(s["arguments"].values(), scores, strict=True):
            expected, greedy = offline_loglikelihood(builtin_llm, args["arg_0"], args["arg_1"])
            assert float(loglikelihood) == pytest.approx(expected, abs=1e-5), args
            assert is_greedy == str(greedy)


def offline_loglikelihood(llm: LLM, context: str, continuation: str) -> tuple[float, bool]:
    """The oracle: the offline engine's prompt logprobs of the continuation after the context (split as
    lm_eval splits it: encode the whole, cut at the context's length), and whether each was the top token."""
    tokenizer = llm.get_tokenizer()
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    n_context = len(tokenizer.encode(context, add_special_tokens=False))
    (out,) = llm.generate([whole], SamplingParams(max_tokens=1, prompt_logprobs=0))
    scored = [out.prompt_logprobs[i][whole[i]] for i in range(n_context, len(whole))]
    return sum(lp.logprob for lp in scored), all(lp.rank == 1 for lp in scored)
