"""Prompt checks shared by the in-process engine and the DP front end: tokenize, then validate."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Container
from typing import Any

from tokenizers import Tokenizer, decoders, normalizers

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

    def __call__(self, prompt: Prompt, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """-> (prompt text or None, token ids); raises ValueError naming what is wrong."""
        text, token_ids = self._tokenize(prompt, add_special_tokens)
        self._validate(token_ids)
        return text, token_ids

    def _tokenize(self, prompt: Prompt, add_special_tokens: bool) -> tuple[str | None, list[int]]:
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt if isinstance(prompt, str) else None
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None if text is not None else prompt
        if ids is None and isinstance(text, str):
            return text, self.encode(text, add_special_tokens)
        if isinstance(ids, list | tuple) and all(isinstance(t, int) for t in ids):
            return text, list(ids)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenizes text; one whose length alone shows it cannot fit is refused without tokenizing."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer files; pass prompts as lists of token ids")
        if self.max_token_chars and len(text) > (self.max_model_len - 1) * self.max_token_chars:
            self._too_long(-(-len(text) // self.max_token_chars), "at least ")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _validate(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(token_ids) >= self.max_model_len:
            self._too_long(len(token_ids))
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the model's vocabulary [0, {self.vocab_size})")

    def _too_long(self, num_tokens: int, at_least: str = "") -> None:
        """vLLM's (and OpenAI's) words, which clients look for to detect a context overflow."""
        full = ", which leaves no room for the output" if num_tokens == self.max_model_len else ""
        raise ValueError(
            f"This model's maximum context length is {self.max_model_len} tokens. However, your request has "
            f"{at_least}{num_tokens} input tokens{full}. Please reduce the length of the prompt (or raise "
            "max_model_len)."
        )

    @functools.cached_property
    def max_token_chars(self) -> int | None:
        """The most characters of text one token stands for, where that bounds a prompt's token count from below
        (a prompt of c characters has at least c / this many tokens): byte-level BPE without a normalizer, which
        puts every byte of the text in some token, and whose longest vocabulary entry is its most bytes. None for
        other tokenizers: a normalizer may shorten the text before it is split."""
        backend = getattr(self.tokenizer, "_tokenizer", None)
        if not isinstance(backend, Tokenizer) or not isinstance(backend.decoder, decoders.ByteLevel):
            return None
        norm = backend.normalizer
        if norm is not None and not (isinstance(norm, normalizers.Sequence) and len(norm) == 0):
            return None
        return max(map(len, backend.get_vocab(with_added_tokens=True)))
