"""The engine loop: requests in, one scheduled step at a time, outputs out."""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch

from twinbatch.config import EngineConfig
from twinbatch.engine.request import Request
from twinbatch.layers.sampler import sample
from twinbatch.outputs import CompletionOutput, RequestOutput
from twinbatch.sampling_params import SamplingParams
from twinbatch.tokenizer import load_tokenizer
from twinbatch.worker.block_manager import BlockManager
from twinbatch.worker.model_runner import ModelRunner
from twinbatch.worker.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer_path)
        self.model_runner = ModelRunner(config)
        self.block_manager = BlockManager(config.cache.num_blocks, config.cache.block_size)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator(config.device).manual_seed(config.seed)
        self._ids = itertools.count()

    def add_request(
        self, prompt: str | list[int] | dict[str, Any], params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Validates and queues a request; raises ValueError (and changes nothing) on bad input."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params.verify()
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids)
        gen = None if params.seed is None else torch.Generator(self.config.device).manual_seed(params.seed)
        req = Request(request_id, text, token_ids, params, generator=gen)
        self.requests[request_id] = req
        self.scheduler.add_request(req)
        return request_id

    def _tokenize(self, prompt: str | list[int] | dict[str, Any]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer files; pass prompts as lists of token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _validate_prompt(self, token_ids: list[int]) -> None:
        max_len, vocab = self.config.scheduler.max_model_len, self.config.model.vocab_size
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(token_ids) >= max_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {max_len}; "
                "shorten the prompt or raise max_model_len"
            )
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step; returns outputs of the requests that produced a token or finished."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        logits = self.model_runner.execute_model(batch)
        self.scheduler.update_after_step(batch)
        return self._process(batch, logits)

    def _process(self, batch: SchedulerOutput, logits: torch.Tensor) -> list[RequestOutput]:
        sampled = [s.request for s in batch.scheduled if s.request.num_computed_tokens == s.request.num_tokens]
        params = [r.sampling_params for r in sampled]
        tokens = sample(logits, params, [r.generator for r in sampled], self.generator)
        outputs = []
        for req, token in zip(sampled, tokens, strict=True):
            req.output_token_ids.append(token)
            self._check_stop(req, token)
            outputs.append(self._make_output(req))
            if req.is_finished:
                del self.requests[req.request_id]
        return outputs

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.sampling_params
        reason, stop = None, None
        if token in p.stop_token_ids:
            reason, stop = "stop", token
        elif token in self.config.model.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif p.stop_strings and (hit := self._stop_string(req)) is not None:
            reason, stop = "stop", hit
        elif (
            len(req.output_token_ids) >= (p.max_tokens or float("inf"))
            or req.num_tokens >= self.config.scheduler.max_model_len
        ):
            reason = "length"
        if reason is not None:
            req.stop_reason = stop
            self.scheduler.finish(req, reason)

    def _stop_string(self, req: Request) -> str | None:
        text = self._detokenize(req)
        hits = [(text.find(s), s) for s in req.sampling_params.stop_strings if s in text]
        return min(hits)[1] if hits else None

    def _detokenize(self, req: Request) -> str:
        if self.tokenizer is None:
            return ""
        skip = req.sampling_params.skip_special_tokens
        return self.tokenizer.decode(req.output_token_ids, skip_special_tokens=skip)

    def _make_output(self, req: Request) -> RequestOutput:
        text = self._detokenize(req) if req.is_finished else ""
        if isinstance(req.stop_reason, str):
            text = text[: text.find(req.stop_reason)]
        completion = CompletionOutput(0, text, list(req.output_token_ids), req.finish_reason, req.stop_reason)
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, [completion], req.is_finished)
