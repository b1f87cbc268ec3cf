"""A request's state as it moves through the scheduler: tokens, progress through them, and its KV blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from twinbatch.core.detokenizer import IncrementalDetokenizer
from twinbatch.outputs import PromptLogprobs, RequestMetrics, SampleLogprobs
from twinbatch.sampling_params import SamplingParams

PLACEHOLDER = -1  # an output token sampled on the device, not yet copied to the host


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    # sampled tokens not yet on the host (asynchronous scheduling): the last ones of output_token_ids, PLACEHOLDER
    num_pending: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None  # per-request seed
    detokenizer: IncrementalDetokenizer | None = None
    logprobs: SampleLogprobs | None = None  # one entry per output token, with SamplingParams.logprobs
    prompt_logprobs: PromptLogprobs | None = None  # one entry per prompt token scored so far (the first: None)
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None  # first scheduled
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if self.sampling_params.logprobs is not None:
            self.logprobs = []
        if self.sampling_params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    def token_ids(self, lo: int, hi: int) -> list[int]:
        """Tokens lo..hi-1 of prompt + output, without copying the whole sequence (a decode step asks for one)."""
        p = len(self.prompt_token_ids)
        if lo >= p:
            return self.output_token_ids[lo - p : hi - p]
        return self.prompt_token_ids[lo:hi] + self.output_token_ids[: max(0, hi - p)]

    def metrics(self, now: float) -> RequestMetrics:
        """Its phases, for a request finishing now (one never scheduled spent all its time queued)."""
        scheduled = self.scheduled_time or now
        first = self.first_token_time or now
        return RequestMetrics(scheduled - self.arrival_time, first - scheduled, now - first, now - scheduled,
                              self.num_preemptions)  # fmt: skip

    @property
    def resolved_output(self) -> list[int]:
        """The output tokens the host has, those still on the device left out."""
        return self.output_token_ids[: len(self.output_token_ids) - self.num_pending]

    def at_length_limit(self, max_model_len: int, pending: bool = True) -> bool:
        """No token may follow its last one: max_tokens or max_model_len reached, counting the tokens still on the
        device unless `pending` is False."""
        uncounted = 0 if pending else self.num_pending
        max_tokens = self.sampling_params.max_tokens or float("inf")
        return len(self.output_token_ids) - uncounted >= max_tokens or self.num_tokens - uncounted >= max_model_len

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
