"""What generate() returns, with vLLM's field names."""

from __future__ import annotations

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
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    logprobs: SampleLogprobs | None = None  # with SamplingParams.logprobs

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs, once the prompt is scored
