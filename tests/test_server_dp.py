"""`twinbatch serve` with two DP ranks (expert parallel, gloo, DBO on) on the tiny Hugging Face DeepSeek-V2
checkpoint: requests reach both ranks and give the one-process tokens, echoed prompt logprobs equal Hugging Face's,
a full queue answers 503, and a rank that dies fails pending requests with 500 and stops the server.

The checkpoint has no tokenizer: prompts are token ids, and logprob token strings read "token_id:N".
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import metrics, post
from hf_oracle import hf_logits
from openai_server import gauges, launch_server, server_process

from twinbatch import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 7, 99], list(range(30, 47)), [(i * 37) % 250 + 2 for i in range(30)], [9, 8, 3, 4]]
MAX_TOKENS = 6
MAX_NUM_SEQS, MAX_WAITING = 2, 1  # per rank, x2 ranks: at most 5 unfinished requests


FLAGS = ["--max-model-len", "128", "--data-parallel-size", "2", "--enable-expert-parallel", "--all2all-backend",
         "all2all", "--enable-dbo", "--dbo-decode-token-threshold", "2", "--dbo-prefill-token-threshold", "2",
         "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING)]  # fmt: skip


@pytest.fixture(scope="module")
def url(dsv2_dir: Path) -> Iterator[str]:
    with launch_server(str(dsv2_dir), *FLAGS) as url:
        yield url


def token_ids(choice: dict[str, Any]) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def test_requests_reach_both_ranks_and_match_one_process(url: str, dsv2_dir: Path) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(str(dsv2_dir), max_model_len=128).generate(PROMPTS, params)]
    before = metrics(url)

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> list[int]:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        r = await client.post(url + "/v1/completions", json=body)
        return token_ids(r.json()["choices"][0])

    async def main() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    assert asyncio.run(main()) == expected
    after = metrics(url)
    grew = {
        r: after[("vllm:prompt_tokens_total", (("engine", r),))]
        - before.get(("vllm:prompt_tokens_total", (("engine", r),)), 0)
        for r in "01"
    }
    assert all(grew.values()) and sum(grew.values()) == sum(map(len, PROMPTS)), grew  # least-loaded routing
    for r in "01":
        assert after[("twinbatch:dbo_steps_total", (("engine", r), ("reason", "microbatched")))] > 0


def test_echo_logprobs_match_hugging_face(url: str, dsv2_dir: Path) -> None:
    body = {"prompt": PROMPTS[:3], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    for choice, prompt in zip(post(url, "/v1/completions", body)["choices"], PROMPTS[:3], strict=True):
        lp = choice["logprobs"]
        ids = token_ids(choice)
        assert ids[: len(prompt)] == prompt and len(ids) == len(prompt) + 1
        expected = hf_logits(dsv2_dir, ids).log_softmax(-1)  # [len, vocab]
        assert lp["token_logprobs"][0] is None
        for p in range(1, len(ids)):
            assert lp["token_logprobs"][p] == pytest.approx(float(expected[p - 1, ids[p]]), abs=1e-4)
            assert max(lp["top_logprobs"][p].values()) == pytest.approx(float(expected[p - 1].max()), abs=1e-4)


def test_full_queue_answers_503(url: str) -> None:
    limit = MAX_NUM_SEQS * 2 + MAX_WAITING
    body = {"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True, "stream": True}

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            streams = [client.stream("POST", url + "/v1/completions", json=body) for _ in range(limit)]
            responses = await asyncio.gather(*(s.__aenter__() for s in streams))  # headers: all admitted
            assert all(r.status_code == 200 for r in responses)
            refused = await client.post(url + "/v1/completions", json=body | {"stream": False})
            too_many = await client.post(url + "/v1/completions", json=body | {"n": limit + 1})
            for s in streams:
                await s.__aexit__(None, None, None)  # disconnect: aborts them
        return refused, too_many

    refused, too_many = asyncio.run(main())
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert error["type"] == "ServiceUnavailableError" and error["code"] == 503 and "retry later" in error["message"]
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    deadline = time.monotonic() + 10
    while any(v for (name, _), v in metrics(url).items() if name == "vllm:num_requests_running"):
        assert time.monotonic() < deadline, "aborted requests still running"
        time.sleep(0.05)
    assert post(url, "/v1/completions", {"prompt": [5], "max_tokens": 2})["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("dp", [1, 2])
def test_dead_rank_fails_pending_requests_and_stops_the_server(dsv2_dir: Path, dp: int) -> None:
    """A killed rank: pending requests fail with 500 naming it, the gauges read zero, the server exits non-zero.
    With DP=1 too: its engine runs in a worker process of its own, which fails the same way."""
    flags, rank = (FLAGS, 1) if dp == 2 else (["--max-model-len", "128"], 0)
    with server_process(str(dsv2_dir), *flags) as server:
        url, pids = server.url, server.worker_pids()
        assert len(pids) == dp
        body = {"prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True}
        pending: list[httpx.Response] = []
        waiter = threading.Thread(
            target=lambda: pending.append(httpx.post(url + "/v1/completions", json=body, timeout=60))
        )
        waiter.start()
        with httpx.stream("POST", url + "/v1/completions", json=body | {"stream": True}, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            next(lines)  # generating
            os.kill(pids[rank], signal.SIGKILL)
            events = list(lines)
        dead = gauges(url)  # in the server's grace before it exits
        waiter.join(60)
        name = f"DP rank {rank}"
        assert events[-1] == "data: [DONE]" and '"code":500' in events[-2] and name in events[-2]
        assert pending[0].status_code == 500 and name in pending[0].json()["error"]["message"]
        assert dead and all(v == 0 for v in dead.values()), dead
        assert server.wait_exit(20) != 0
