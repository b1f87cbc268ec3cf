"""Bad input to `twinbatch serve`: HTTP 400 with an OpenAI error body that names the field and says what to
change, and the server keeps serving. The server is conftest's builtin_server (max_model_len 256)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from twinbatch.entrypoints.cli import main

LONG = list(range(100, 400))  # 300 token ids: longer than max_model_len
COMPLETIONS: list[tuple[Any, str | None, str]] = [
    # (body: a dict, or raw bytes sent as JSON; the param the error names; a piece of its message)
    (b'{"prompt": "Hi", ', None, "not valid JSON"),
    (b'["prompt"]', None, "valid dictionary"),
    ({}, "prompt", "prompt: Field required"),
    ({"prompt": 5}, "prompt", "prompt must be a string, a list of strings, a list of token ids"),
    ({"prompt": [[1, "a"]]}, "prompt", "prompt must be a string"),
    ({"prompt": ""}, "prompt", "the prompt is empty"),
    ({"prompt": []}, "prompt", "prompt is empty"),
    ({"prompt": [[]]}, "prompt", "the prompt is empty"),
    ({"prompt": [1, 2, 10**9]}, "prompt", "outside the model's vocabulary [0, 129280)"),
    ({"prompt": LONG}, "prompt", "the prompt has 300 tokens but max_model_len is 256"),
    ({"prompt": LONG[:250], "max_tokens": 10}, "max_tokens", "maximum context length is 256 tokens"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens", "0 only with echo=true"),
    ({"prompt": "Hi", "max_tokens": -3}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "Hi", "max_tokens": "many"}, "max_tokens", "valid integer"),
    ({"prompt": "Hi", "temperature": -0.5}, "temperature", "greater than or equal to 0"),
    (b'{"prompt": "Hi", "temperature": NaN}', "temperature", "finite number"),
    ({"prompt": "Hi", "top_p": 0}, "top_p", "greater than 0"),
    ({"prompt": "Hi", "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"prompt": "Hi", "top_k": -2}, "top_k", "greater than or equal to -1"),
    ({"prompt": "Hi", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": ["a"] * 11, "n": 128}, "n", "needs 1408 completions (prompts x n)"),
    ({"prompt": "Hi", "model": "gpt-4"}, "model", "The model `gpt-4` does not exist"),
    ({"prompt": "Hi", "stop": [""]}, "stop", "stop strings must not be empty"),
    ({"prompt": "Hi", "stop": 3}, "stop", "stop must be a string or a list of strings"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"prompt": "Hi", "presence_penalty": 0.5}, "presence_penalty", "presence_penalty is not supported"),
    ({"prompt": "Hi", "best_of": 3}, "best_of", "best_of is not supported"),
    ({"prompt": "Hi", "stream_options": {"include_usage": "sure"}}, "stream_options.include_usage", "valid boolean"),
]
OTHERS: list[tuple[str, dict[str, Any], str | None, str]] = [
    ("/v1/chat/completions", {"messages": []}, "messages", "at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "messages.0.role", "'user'"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages",
        "only text content parts",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        "max_tokens",
        "greater than or equal to 1",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 300},
        "max_tokens",
        "maximum context length",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "m"}, "model", "does not exist"),
    ("/tokenize", {}, "prompt", "exactly one of prompt and messages"),
    ("/detokenize", {"tokens": [5, -1]}, "tokens", "outside the vocabulary"),
    ("/detokenize", {"tokens": "abc"}, "tokens", "valid list"),
]


def check_error(r: httpx.Response, param: str | None, message: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == param, error
    assert message in error["message"], error


def check_serves(url: str) -> None:
    assert httpx.get(url + "/health").status_code == 200
    body = {"prompt": "Hello", "max_tokens": 2, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body, param, message", COMPLETIONS, ids=[str(c[0])[:40] for c in COMPLETIONS])
def test_bad_completion_request(builtin_server: str, body: Any, param: str | None, message: str) -> None:
    url = builtin_server + "/v1/completions"
    headers = {"content-type": "application/json"}
    for stream in (False, True):
        if isinstance(body, bytes):
            r = httpx.post(url, content=body, headers=headers, timeout=60)
        else:
            r = httpx.post(url, json=body | {"stream": stream}, timeout=60)
        check_error(r, param, message)
    check_serves(builtin_server)


@pytest.mark.parametrize("path, body, param, message", OTHERS, ids=[f"{o[0]}-{o[3]}" for o in OTHERS])
def test_bad_request_elsewhere(builtin_server: str, path: str, body: dict, param: str | None, message: str) -> None:
    check_error(httpx.post(builtin_server + path, json=body, timeout=60), param, message)
    check_serves(builtin_server)


def test_neutral_and_unknown_fields_are_accepted(builtin_server: str) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1,
            "best_of": 1, "logit_bias": None, "user": "someone", "suffix": None}  # fmt: skip
    r = httpx.post(builtin_server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "foo", "--model", "bar"], "the model is given twice: 'foo' and --model 'bar'"),
        (["serve", "no-such-model"], "is neither a local checkpoint directory nor a built-in preset"),
        (["serve", "--max-waiting-requests", "-1"], "--max-waiting-requests must be >= 0"),
    ],
)
def test_bad_serve_command_line(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(argv)
