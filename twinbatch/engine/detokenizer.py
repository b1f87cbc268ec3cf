"""Incremental detokenization and stop strings: each new token decodes a short window, not the whole output.

The window trick is vLLM's: decode tokens[prefix_offset:] and tokens[prefix_offset:read_offset]; the new text is
the difference. A token that ends inside a multi-byte character decodes to U+FFFD; its text stays pending until
the character is complete, so text once committed never changes.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any | None, skip_special_tokens: bool, stop_strings: list[str]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop_strings = stop_strings
        self.token_ids: list[int] = []
        self.committed = ""  # text of token_ids[:read_offset]
        self.pending = ""  # text of the tokens after read_offset, while it ends in an incomplete character
        self.prefix_offset = 0
        self.read_offset = 0
        self.stop_index: int | None = None  # where the stop string that ended the output starts

    @property
    def text(self) -> str:
        """The whole output text, cut before the stop string once one matched."""
        text = self.committed + self.pending
        return text if self.stop_index is None else text[: self.stop_index]

    def final_text(self, finished: bool) -> str:
        """The text that can no longer change: while running, without pending bytes and without the last
        (longest stop string - 1) characters, which may still turn out to start a stop string."""
        if finished:
            return self.text
        hold = max((len(s) for s in self.stop_strings), default=1) - 1
        return self.committed[: max(0, len(self.committed) - hold)]

    def add_token(self, token_id: int) -> str | None:
        """Appends one token; returns the stop string it completed, if any."""
        self.token_ids.append(token_id)
        if self.tokenizer is None:
            return None
        before = len(self.committed) + len(self.pending)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        new = full[len(prefix) :]
        if new.endswith("\ufffd"):
            self.pending = new
        else:
            self.committed += new
            self.pending = ""
            self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return self._match_stop(before)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)

    def _match_stop(self, new_from: int) -> str | None:
        """Finds the earliest stop string that ends in the new text (earlier text was searched before)."""
        if not self.stop_strings:
            return None
        text = self.committed + self.pending
        hits = []
        for s in self.stop_strings:
            i = text.find(s, max(0, new_from - len(s) + 1))
            if i >= 0:
                hits.append((i, s))
        if not hits:
            return None
        self.stop_index, stop = min(hits)
        return stop
