"""Bad input to `twinbatch serve`: an OpenAI error body that names the field and says what to change (400; 404 for an
unknown model; 413 for a body over the size limit), never a 500, and the server keeps serving: every case is
followed by a request that must succeed. Each case runs on DP=1 (conftest's builtin_server, max_model_len 256) and
on DP=2 with expert parallelism and DBO (the same built-in model in two worker processes), where a request that
reached a worker with a bad field used to stop every rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai_server import BUILTIN_DP2_FLAGS, launch_server

from twinbatch.entrypoints.cli import main, make_parser

LONG = list(range(100, 400))  # 300 token ids: longer than max_model_len
USER = [{"role": "user", "content": "x"}]
DEEP = b"[" * 100_000 + b"]" * 100_000
# fmt: off
COMPLETIONS: list[tuple[Any, int, str | None, str]] = [
    # (body: a dict, or raw bytes; the HTTP status; the param the error names; a piece of its message). A dict
    # without "stream" is sent both streaming and not.
    (b'{"prompt": "Hi", ', 400, None, "not valid JSON"),
    (b'["prompt"]', 400, None, "valid dictionary"),
    (b'{"prompt": "\xff\xfeHi"}', 400, None, "not valid UTF-8"),
    (DEEP, 400, None, "nested too deeply"),
    (b'{"prompt": "Hi", "user": ' + DEEP + b"}", 400, None, "nested too deeply"),
    (b'{"prompt": "a\\ud800b"}', 400, "prompt", "prompt holds a lone surrogate (\\ud800)"),
    (b'{"prompt": ["ok", "\\udfff"]}', 400, "prompt.1", "lone surrogate (\\udfff)"),
    (b'{"prompt": "Hi", "stop": ["\\ud800"]}', 400, "stop.0", "lone surrogate"),
    ({}, 400, "prompt", "prompt: Field required"),
    ({"prompt": 5}, 400, "prompt", "prompt must be a string, a list of strings, a list of token ids"),
    ({"prompt": [[1, "a"]]}, 400, "prompt", "prompt must be a string"),
    ({"prompt": ""}, 400, "prompt", "the prompt is empty"),
    ({"prompt": []}, 400, "prompt", "prompt is empty"),
    ({"prompt": [[]]}, 400, "prompt", "the prompt is empty"),
    ({"prompt": [1, 2, 10**9]}, 400, "prompt", "outside the model's vocabulary [0, 129280)"),
    ({"prompt": LONG}, 400, "prompt", "maximum context length is 256 tokens. However, your request has 300 input"),
    ({"prompt": "Hi " * 40_000}, 400, "prompt", "maximum context length is 256 tokens. However, your request has"),
    ({"prompt": LONG[:250], "max_tokens": 10}, 400, "max_tokens", "maximum context length is 256 tokens. However, "
     "you requested 260 tokens (250 in the prompt, 10 in the completion)"),
    ({"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens", "0 only with echo=true"),
    ({"prompt": "Hi", "max_tokens": -3}, 400, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "Hi", "max_tokens": "many"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "Hi", "temperature": -0.5}, 400, "temperature", "greater than or equal to 0"),
    (b'{"prompt": "Hi", "temperature": NaN}', 400, "temperature", "finite number"),
    ({"prompt": "Hi", "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"prompt": "Hi", "top_p": 1.5}, 400, "top_p", "less than or equal to 1"),
    ({"prompt": "Hi", "top_k": -2}, 400, "top_k", "greater than or equal to -1"),
    ({"prompt": "Hi", "n": 0}, 400, "n", "greater than or equal to 1"),
    ({"prompt": ["a"] * 13, "n": 128}, 400, "n", "needs 1664 completions (prompts x n)"),
    ({"prompt": "Hi", "seed": 2**70}, 400, "seed", "less than or equal to 9223372036854775807"),
    ({"prompt": "Hi", "seed": -(2**70)}, 400, "seed", "greater than or equal to -9223372036854775808"),
    ({"prompt": "Hi", "seed": 2**64 - 1, "n": 2}, 400, "seed", "less than or equal to 9223372036854775807"),
    ({"prompt": "Hi", "seed": 2**63 - 1, "n": 2}, 400, "seed", "seed + n - 1 must be at most 2**63 - 1"),
    ({"prompt": "Hi", "model": "gpt-4"}, 404, "model", "The model `gpt-4` does not exist"),
    ({"prompt": "Hi", "stop": [""]}, 400, "stop", "stop strings must not be empty"),
    ({"prompt": "Hi", "stop": 3}, 400, "stop", "stop must be a string or a list of strings"),
    ({"prompt": "Hi", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ({"prompt": "Hi", "presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty is not supported"),
    ({"prompt": "Hi", "best_of": 3}, 400, "best_of", "best_of is not supported"),
    ({"prompt": "Hi", "logit_bias": {"5": 10}}, 400, "logit_bias", "logit_bias is not supported"),
    ({"prompt": "Hi", "suffix": "end"}, 400, "suffix", 'leave it out (or at "")'),
    ({"prompt": "Hi", "stream": True, "stream_options": {"include_usage": "sure"}}, 400,
     "stream_options.include_usage", "valid boolean"),
    ({"prompt": "Hi", "stream": False, "stream_options": {"include_usage": True}}, 400, "stream_options",
     "stream_options is only allowed with stream: true"),
]
OTHERS: list[tuple[str, Any, int, str | None, str]] = [
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1 item"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400, "messages.0.role", "'user'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     "only text content parts"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 300}, 400, "max_tokens", "maximum context length"),
    ("/v1/chat/completions", {"messages": USER, "model": "m"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages.0.content",
     "lone surrogate"),
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs", "needs logprobs: true"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, 400, "tools", "not supported"),
    ("/v1/chat/completions", {"messages": USER, "response_format": {"type": "json_object"}}, 400, "response_format",
     "not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 40_000}]}, 400, "messages",
     "maximum context length is 256 tokens"),
    ("/v1/chat/completions", b"\xff", 400, None, "not valid UTF-8"),
    ("/tokenize", {}, 400, "prompt", "exactly one of prompt and messages"),
    ("/tokenize", b'{"prompt": "\\ud800"}', 400, "prompt", "lone surrogate"),
    ("/tokenize", {"prompt": "x", "model": "m"}, 404, "model", "does not exist"),
    ("/tokenize", DEEP, 400, None, "nested too deeply"),
    ("/detokenize", {"tokens": [5, -1]}, 400, "tokens", "outside the vocabulary"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "valid list"),
]
# fmt: on
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestTooLargeError"}


@pytest.fixture(scope="module", params=["dp1", "dp2"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "dp1":
        yield request.getfixturevalue("builtin_server")
        return
    with launch_server(*BUILTIN_DP2_FLAGS, "--served-model-name", "twinbatch/tiny-deepseek-v2", "tiny") as url:
        yield url


def check_error(r: httpx.Response, status: int, param: str | None, message: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error == {"message": error["message"], "type": ERROR_TYPES[status], "param": param, "code": status}
    assert message in error["message"], error


def check_serves(url: str) -> None:
    assert httpx.get(url + "/health").status_code == 200
    body = {"prompt": "Hello", "max_tokens": 2, "ignore_eos": True}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def send(url: str, body: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url, json=body, timeout=60)


@pytest.mark.parametrize("body, status, param, message", COMPLETIONS, ids=[str(c[0])[:40] for c in COMPLETIONS])
def test_bad_completion_request(url: str, body: Any, status: int, param: str | None, message: str) -> None:
    variants = [body] if isinstance(body, bytes) or "stream" in body else [body, body | {"stream": True}]
    for variant in variants:
        check_error(send(url + "/v1/completions", variant), status, param, message)
    check_serves(url)


@pytest.mark.parametrize("path, body, status, param, message", OTHERS, ids=[f"{o[0]}-{o[4]}" for o in OTHERS])
def test_bad_request_elsewhere(url: str, path: str, body: Any, status: int, param: str | None, message: str) -> None:
    check_error(send(url + path, body), status, param, message)
    check_serves(url)


def test_unknown_path_and_method_get_openai_bodies(url: str) -> None:
    check_error(httpx.post(url + "/v1/nothing", json={}), 404, None, "Not Found")
    r = httpx.get(url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed", r.text


def test_body_over_the_limit_is_413(url: str) -> None:
    body = b'{"prompt": "' + b"x" * (32 << 20) + b'"}'
    check_error(send(url + "/v1/completions", body), 413, None, "larger than 33554432 bytes")
    check_serves(url)


@pytest.mark.parametrize(
    "path, fields",
    [
        ("/v1/completions", {"presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1, "best_of": 2,
                             "n": 2, "logit_bias": {}, "user": "someone", "suffix": "", "seed": 2**63 - 2}),
        ("/v1/completions", {"logit_bias": None, "suffix": None, "best_of": None, "seed": -(2**63)}),
        ("/v1/chat/completions", {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                                  "presence_penalty": 0, "frequency_penalty": 0}),
    ],
)  # fmt: skip
def test_off_values_and_unknown_fields_are_accepted(url: str, path: str, fields: dict[str, Any]) -> None:
    prompt = {"messages": USER} if "chat" in path else {"prompt": "Hi"}
    r = httpx.post(url + path, json=prompt | {"max_tokens": 2} | fields, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == fields.get("n", 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "foo", "--model", "bar"], "the model is given twice: 'foo' and --model 'bar'"),
        (["serve", "no-such-model"], "is neither a local checkpoint directory nor a built-in preset"),
        (["serve", "--max-waiting-requests", "-1"], "--max-waiting-requests must be >= 0"),
        (["serve", "--max-request-body-bytes", "0"], "--max-request-body-bytes must be >= 1"),
    ],
)
def test_bad_serve_command_line(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_cors_flags_take_json_lists(capsys: pytest.CaptureFixture[str]) -> None:
    args = make_parser().parse_args(["serve", "--allowed-origins", '["http://a.example"]', "--allow-credentials"])
    assert args.allowed_origins == ["http://a.example"] and args.allowed_methods == ["*"] and args.allow_credentials
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--allowed-origins", "http://a.example"])
    assert "expected a JSON list of strings" in capsys.readouterr().err
