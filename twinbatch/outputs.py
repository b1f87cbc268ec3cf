"""What generate() returns, with vLLM's field names."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 + the number of tokens more likely than this one


# One dict per token: the scored token first, then the top-k tokens in rank order (vLLM's layout).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]  # None for the first prompt token, which nothing predicts


@dataclass
class CompletionOutput:
    index: int
    text: str  # while running: the text that is final so far (a possible stop string's start is held back)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    logprobs: SampleLogprobs | None = None  # with SamplingParams.logprobs

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestError:
    """Why one request failed on its own (the engine serves the others on)."""

    message: str  # one line, no traceback: it reaches the client
    bad_input: bool  # the request itself was invalid (HTTP 400); else the engine failed on it (HTTP 500)


@dataclass(frozen=True)
class RequestMetrics:
    """A finished request's phases in seconds, on the clock of the engine that ran it (vLLM's definitions)."""

    queue_time: float  # added -> first scheduled
    prefill_time: float  # first scheduled -> first token
    decode_time: float  # first token -> last token
    inference_time: float  # first scheduled -> last token
    num_preemptions: int


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs, once the prompt is scored
    error: RequestError | None = None  # set on the last output of a request that failed alone
    metrics: RequestMetrics | None = None  # on the last output of a request that ran
    engine_index: int = 0  # the DP rank that runs the request

    @staticmethod
    def failed(request_id: str, error: RequestError, engine_index: int = 0) -> RequestOutput:
        completion = CompletionOutput(0, "", [], "error")
        return RequestOutput(request_id, None, [], [completion], True, error=error, engine_index=engine_index)


_PATH = re.compile(r"(?:/[\w.~+-]+){2,}(?::\d+)?")


def error_line(e: BaseException) -> str:
    """An exception as one line for a client: its type and the first line of its message, file paths (which
    C++ errors put in their message) elided. The traceback belongs in the log."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    first = _PATH.sub("<path>", first)[:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
