"""Incremental detokenization and stop strings: each new token costs a constant amount of decoding.

A fast (Rust) tokenizer decodes with `tokenizers.decoders.DecodeStream` (about 1 us a token), as vLLM does.
Others use vLLM's window method: decode tokens[prefix_offset:] and tokens[prefix_offset:read_offset]; the new
text is the difference. Either way a token that ends inside a multi-byte character adds no text until the
character is complete, so text once produced never changes (an output cut inside a character ends before it).
"""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any | None, skip_special_tokens: bool, stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = stop_strings
        backend = getattr(tokenizer, "_tokenizer", None)
        self.backend = backend if isinstance(backend, Tokenizer) else None
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens) if self.backend is not None else None
        self.token_ids: list[int] = []
        self.output = ""  # the text of every complete character so far
        self.prefix_offset = 0  # window method only
        self.read_offset = 0
        self.stop_index: int | None = None  # where the stop string that ended the output starts

    @property
    def text(self) -> str:
        """The whole output text, cut before the stop string once one matched."""
        return self.output if self.stop_index is None else self.output[: self.stop_index]

    def final_text(self, finished: bool) -> str:
        """The text that can no longer change: while running, all but the last (longest stop string - 1)
        characters, which may still turn out to start a stop string."""
        if finished:
            return self.text
        hold = max((len(s) for s in self.stop_strings), default=1) - 1
        return self.output[: max(0, len(self.output) - hold)]

    def add_token(self, token_id: int) -> str | None:
        """Appends one token; returns the stop string it completed, if any."""
        self.token_ids.append(token_id)
        if self.tokenizer is None:
            return None
        before = len(self.output)
        if self.stream is not None:
            self.output += self.stream.step(self.backend, token_id) or ""
        else:
            self.output += self._window_step()
        return self._match_stop(before)

    def _window_step(self) -> str:
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # no complete character yet
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _match_stop(self, new_from: int) -> str | None:
        """Finds the earliest stop string that ends in the new text (earlier text was searched before)."""
        hits = []
        for s in self.stop_strings:
            i = self.output.find(s, max(0, new_from - len(s) + 1))
            if i >= 0:
                hits.append((i, s))
        if not hits:
            return None
        self.stop_index, stop = min(hits)
        return stop
