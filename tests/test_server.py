"""`twinbatch serve` on the built-in model, over real HTTP: response and stream formats, the offline engine as the
oracle for text and logprobs, metrics, disconnects, concurrency. Bad input: tests/test_server_errors.py.

One server (conftest's builtin_server, a subprocess on a free port); the builtin_llm fixture has its weights.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from importlib.metadata import version
from typing import Any

import httpx
import pytest
from helpers import metrics, post

from twinbatch import LLM, SamplingParams
from twinbatch.engine.llm_engine import StepTimes
from twinbatch.entrypoints.openai.serving_chat import DEFAULT_CHAT_TEMPLATE

MODEL = "twinbatch/tiny-deepseek-v2"
PROMPTS = ["Hello, my name is", "The capital of France is"]
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def url(builtin_server: str) -> str:
    return builtin_server


def stream(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    """The events of a streamed response: parsed JSON objects, and the final "[DONE]"."""
    events = []
    with httpx.stream("POST", url + path, json=body | {"stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def greedy(llm: LLM, prompts: list, max_tokens: int, **kwargs: Any) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)
    return llm.generate(prompts, params, use_tqdm=False)


def test_models_and_health(url: str) -> None:
    assert httpx.get(url + "/health").status_code == 200
    models = httpx.get(url + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL, "tiny"] and models["data"][0]["max_model_len"] == 256


def test_greedy_completion_equals_llm_generate(url: str, builtin_llm: LLM) -> None:
    body = {"model": "tiny", "prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    out = post(url, "/v1/completions", body)
    expected = greedy(builtin_llm, PROMPTS, 12)
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert [c["text"] for c in out["choices"]] == [e.outputs[0].text for e in expected]
    assert all(c["finish_reason"] == "length" and c["logprobs"] is None for c in out["choices"])
    prompt_tokens = sum(len(e.prompt_token_ids) for e in expected)
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 24, "total_tokens": prompt_tokens + 24}


def test_stream_chunks_usage_and_done(url: str, builtin_llm: LLM) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    events = stream(url, "/v1/completions", body | {"stream_options": {"include_usage": True}})
    *chunks, last = events
    assert len(chunks) == 10  # one event per token
    assert all(len(c["choices"]) == 1 and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in events}) == 1 and all(c["object"] == "text_completion" for c in events)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 9 + ["length"]
    (expected,) = greedy(builtin_llm, PROMPTS[:1], 10)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected.outputs[0].text
    n = len(expected.prompt_token_ids)
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": n,
        "completion_tokens": 10,
        "total_tokens": n + 10,
    }
    assert all("usage" not in c for c in stream(url, "/v1/completions", body | {"max_tokens": 2}))


def straddling_stop(llm: LLM, token_ids: list[int]) -> str:
    """A stop string made of the end of one output token and the start of the next, first seen there: the
    stream must hold back the first part until the second shows it is a stop string."""
    decode = llm.get_tokenizer().decode
    text = decode(token_ids)
    for k in range(len(token_ids) // 2, len(token_ids) - 1):
        cut = len(decode(token_ids[: k + 1]))
        stop = text[cut - 2 : cut + 2]
        if (
            len(decode(token_ids[k : k + 1])) >= 2
            and len(decode(token_ids[k + 1 : k + 2])) >= 2
            and text.find(stop) == cut - 2
        ):
            return stop
    raise AssertionError(f"no stop string straddles two tokens in {text!r}")


def test_stop_string_never_reaches_the_stream(url: str, builtin_llm: LLM) -> None:
    (full,) = greedy(builtin_llm, PROMPTS[1:], 24)
    text, stop = full.outputs[0].text, straddling_stop(builtin_llm, full.outputs[0].token_ids)
    body = {"prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop, "zzzz"]}
    chunks = stream(url, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[: text.find(stop)]
    assert (chunks[-1]["choices"][0]["finish_reason"], chunks[-1]["choices"][0]["stop_reason"]) == ("stop", stop)
    assert post(url, "/v1/completions", body)["choices"][0]["text"] == text[: text.find(stop)]


def test_n_fans_out_with_offset_seeds(url: str) -> None:
    body = {"prompt": [[5, 6, 7], [8, 9]], "max_tokens": 6, "n": 2, "seed": 11, "ignore_eos": True}
    out = post(url, "/v1/completions", body)
    texts = [c["text"] for c in sorted(out["choices"], key=lambda c: c["index"])]
    assert len(texts) == 4 and texts[0] != texts[1]
    one = post(url, "/v1/completions", body | {"prompt": [8, 9], "n": 1, "seed": 12})  # prompt 1, sample 1
    assert one["choices"][0]["text"] == texts[3]
    assert out["usage"]["prompt_tokens"] == 5 and out["usage"]["completion_tokens"] == 24
    chunks = stream(url, "/v1/completions", body)
    streamed = {i: "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i) for i in range(4)}
    assert list(streamed.values()) == texts


def test_echo_logprobs_as_lm_eval_reads_them(url: str, builtin_llm: LLM) -> None:
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1."""
    tokenizer = builtin_llm.get_tokenizer()
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    body = {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    out = post(url, "/v1/completions", body)
    expected = greedy(builtin_llm, prompts, 1, prompt_logprobs=1, logprobs=1)
    for choice, exp, ids in zip(out["choices"], expected, prompts, strict=True):
        lp = choice["logprobs"]
        scored = [*ids, *exp.outputs[0].token_ids]
        assert lp["tokens"] == [tokenizer.decode([t]) for t in scored]
        assert choice["text"] == tokenizer.decode(ids) + exp.outputs[0].text
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        steps = exp.prompt_logprobs[1:] + exp.outputs[0].logprobs
        for t, got, top, step in zip(scored[1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], steps, strict=True):
            assert got == pytest.approx(step[t].logprob, abs=1e-5)
            assert max(top.values()) == pytest.approx(max(x.logprob for x in step.values()), abs=1e-5)
        assert lp["text_offset"] == [sum(len(s) for s in lp["tokens"][:i]) for i in range(len(scored))]


def test_echo_with_max_tokens_zero_only_scores_the_prompt(url: str, builtin_llm: LLM) -> None:
    body = {"prompt": PROMPTS[0], "echo": True, "logprobs": 0, "max_tokens": 0}
    out = post(url, "/v1/completions", body)
    (choice,) = out["choices"]
    n = len(builtin_llm.get_tokenizer().encode(PROMPTS[0]))
    assert choice["text"] == PROMPTS[0] and choice["finish_reason"] == "length"
    assert len(choice["logprobs"]["tokens"]) == n and out["usage"]["completion_tokens"] == 0
    chunks = stream(url, "/v1/completions", body)
    assert [c["choices"][0]["text"] for c in chunks] == [PROMPTS[0]]


def test_chat(url: str, builtin_llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    out = post(url, "/v1/chat/completions", body)
    tokenizer = builtin_llm.get_tokenizer()
    prompt = tokenizer.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)  # fmt: skip
    assert prompt == "system: Be brief.\nuser: Hi!\nassistant:"
    (expected,) = greedy(builtin_llm, [tokenizer.encode(prompt)], 8)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": expected.outputs[0].text}
    assert out["usage"]["prompt_tokens"] == len(expected.prompt_token_ids)
    events = stream(url, "/v1/chat/completions", body | {"stream_options": {"include_usage": True}})
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"] for e in events[1:-1]]
    assert all("role" not in d for d in deltas) and len(deltas) == 8
    assert "".join(d["content"] for d in deltas) == expected.outputs[0].text
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-1]["usage"]["completion_tokens"] == 8


def test_chat_logprobs(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}  # fmt: skip
    content = post(url, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for entry in content:
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted(
            (t["logprob"] for t in entry["top_logprobs"]), reverse=True
        )
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the top token
        assert bytes(entry["bytes"]).decode() == entry["token"]


def test_tokenize_detokenize_tokenizer_info(url: str, builtin_llm: LLM) -> None:
    tokenizer = builtin_llm.get_tokenizer()
    out = post(url, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False})
    assert out["tokens"] == tokenizer.encode("Hello world", add_special_tokens=False)
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 256
    assert post(url, "/detokenize", {"tokens": out["tokens"]}) == {"prompt": "Hello world"}
    chat = post(url, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}], "return_token_strs": True})
    assert tokenizer.decode(chat["tokens"]) == "user: Hi\nassistant:" and len(chat["token_strs"]) == chat["count"]
    info = httpx.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == DEFAULT_CHAT_TEMPLATE


def test_metrics_count_tokens_and_latencies(url: str) -> None:
    before = metrics(url)
    post(url, "/v1/completions", {"prompt": [5, 6, 7, 8], "max_tokens": 5, "ignore_eos": True})
    after = metrics(url)
    engine = (("engine", "0"),)

    def grew(name: str, labels: tuple = engine) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert all(("engine", "0") in labels for _, labels in after), "every series carries the engine label"
    assert grew("vllm:prompt_tokens_total") == 4 and grew("vllm:generation_tokens_total") == 5
    assert grew("vllm:time_to_first_token_seconds_count") == 1 and grew("vllm:e2e_request_latency_seconds_count") == 1
    assert grew("vllm:inter_token_latency_seconds_count") == 4 and grew("vllm:time_per_output_token_seconds_count") == 4
    assert grew("vllm:request_success_total", (*engine, ("finished_reason", "length"))) == 1
    assert grew("vllm:request_prompt_tokens_sum") == 4 and grew("vllm:request_generation_tokens_sum") == 5
    assert grew("vllm:request_params_max_tokens_sum") == 5 and grew("vllm:request_params_n_sum") == 1
    phases = {p: grew(f"vllm:request_{p}_seconds_sum") for p in ("queue_time", "prefill_time", "decode_time")}
    assert all(grew(f"vllm:request_{p}_seconds_count") == 1 for p in phases) and all(v >= 0 for v in phases.values())
    inference = grew("vllm:request_inference_time_seconds_sum")
    assert inference == pytest.approx(phases["prefill_time"] + phases["decode_time"], abs=1e-6)
    assert 0 < inference <= grew("vllm:e2e_request_latency_seconds_sum")
    assert grew("vllm:num_preemptions_total") == 0
    assert grew("twinbatch:engine_step_seconds_count") == 5  # the prefill step, then 4 decode steps
    step_s, host_s = grew("twinbatch:engine_step_seconds_sum"), grew("twinbatch:engine_step_host_seconds_total")
    assert 0 < host_s < step_s <= grew("vllm:e2e_request_latency_seconds_sum")
    info = next(labels for name, labels in after if name == "vllm:cache_config_info")
    assert ("block_size", "16") in info and ("cache_dtype", "float32") in info
    assert after[("vllm:num_requests_running", engine)] == 0 and after[("vllm:kv_cache_usage_perc", engine)] == 0


def test_step_times_count_a_step_past_the_last_bucket_in_inf_alone() -> None:
    times = StepTimes()
    times.observe(0.004, 0.003)
    times.observe(12.0, 11.0)  # past the last bucket (10 s)
    stats = times.as_dict()
    assert stats["count"] == 2 and stats["buckets"][-1] == (10.0, 1) and stats["buckets"][2] == (0.005, 1)
    assert stats["sum"] == pytest.approx(12.004) and stats["host_sum"] == pytest.approx(1.001)


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = metrics(url)
        engine = (("engine", "0"),)
        if m[("vllm:num_requests_running", engine)] == 0 and m[("vllm:kv_cache_usage_perc", engine)] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"requests still running or KV blocks held: {m}")


@pytest.mark.parametrize("streamed", [True, False])
def test_disconnect_aborts_and_frees_kv(url: str, streamed: bool) -> None:
    generated = (("vllm:generation_tokens_total", (("engine", "0"),)),)[0]
    before_all = metrics(url)
    before = before_all[generated]
    body = {"prompt": PROMPTS[0], "max_tokens": 240, "ignore_eos": True, "stream": streamed}
    if streamed:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = (line for line in r.iter_lines() if line)
            for _ in range(3):
                next(lines)
            assert metrics(url)[("vllm:kv_cache_usage_perc", (("engine", "0"),))] > 0
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=0.5)
    after = wait_idle(url)
    assert after[generated] - before < 240  # stopped early
    abort = ("vllm:request_success_total", (("engine", "0"), ("finished_reason", "abort")))
    assert after[abort] - before_all.get(abort, 0) == 1


def test_64_concurrent_streams(url: str) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int, str]:
        body = {"prompt": [10 + i, 20, 30], "max_tokens": 4 + i % 7, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        chunks, usage, done = 0, None, ""
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = line
                elif line:
                    event = json.loads(line[6:])
                    chunks += len(event["choices"])
                    usage = event.get("usage") or usage
        return chunks, usage["completion_tokens"], done

    async def main() -> list[tuple[int, int, str]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert results == [(4 + i % 7, 4 + i % 7, "data: [DONE]") for i in range(64)]
    wait_idle(url)


def test_continuous_usage_stats_put_usage_in_every_chunk(url: str) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, prompt in (("/v1/completions", {"prompt": [5, 6, 7]}), ("/v1/chat/completions", {"messages": CHAT})):
        body = prompt | {"max_tokens": 4, "ignore_eos": True, "stream_options": options}
        *chunks, final = stream(url, path, body)
        prompt_tokens = final["usage"]["prompt_tokens"]
        completion = [c["usage"]["completion_tokens"] for c in chunks]
        assert all(c["usage"]["prompt_tokens"] == prompt_tokens for c in chunks)
        assert completion[-4:] == [1, 2, 3, 4] and set(completion[:-4]) <= {0}  # chat: the role chunk first
        assert final["usage"] == {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 4,
            "total_tokens": prompt_tokens + 4,
        }
    no_continuous = stream(
        url, "/v1/completions", {"prompt": [5], "max_tokens": 2, "stream_options": {"include_usage": True}}
    )
    assert [c["usage"] for c in no_continuous[:-1]] == [None, None]


def test_version_ping_load_and_cors(url: str) -> None:
    assert httpx.get(url + "/version").json() == {"version": version("twinbatch")}
    assert httpx.get(url + "/ping").status_code == 200 and httpx.post(url + "/ping").status_code == 200
    assert httpx.get(url + "/load").json() == {"server_load": 0}
    preflight = httpx.options(url + "/v1/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST"})  # fmt: skip
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "*"


def test_idle_keep_alive_connection_is_reused(url: str) -> None:
    """uvicorn's own default closes a connection idle for 5 s, racing a client that reuses it; serve keeps it 60 s."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        sock.sendall(request)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # b"" if the server had closed it
