"""Prompt checks shared by the in-process engine and the DP front end: tokenize, then validate."""

from __future__ import annotations

import itertools
from collections.abc import Container
from typing import Any

from twinbatch.sampling_params import SamplingParams

Prompt = str | list[int] | dict[str, Any]


class InputProcessor:
    def __init__(self, tokenizer: Any | None, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer, self.max_model_len, self.vocab_size = tokenizer, max_model_len, vocab_size
        self._ids = itertools.count()

    def new_request(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None, in_use: Container[str]
    ) -> tuple[str, str | None, list[int]]:
        """Checks one request before anything is queued -> (request id, prompt text or None, token ids)."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in in_use:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params.verify()
        return (request_id, *self(prompt))

    def __call__(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """-> (prompt text or None, token ids); raises ValueError naming what is wrong."""
        text, token_ids = self._tokenize(prompt)
        self._validate(token_ids)
        return text, token_ids

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt if isinstance(prompt, str) else None
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None if text is not None else prompt
        if ids is None and isinstance(text, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer files; pass prompts as lists of token ids")
            return text, self.tokenizer.encode(text)
        if isinstance(ids, list | tuple) and all(isinstance(t, int) for t in ids):
            return text, list(ids)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _validate(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}; "
                "shorten the prompt or raise max_model_len"
            )
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {self.vocab_size})")
