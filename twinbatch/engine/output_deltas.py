"""Outputs between a DP rank and its front end as deltas: what each step added, not the whole request again.

An engine's RequestOutput is cumulative (every token, the text and the logprobs so far). Sent whole, a step of
256 requests 512 tokens in weighed 1 MB and took 13 ms to pickle, send and unpickle on a 2-core machine; its
deltas weigh a few KB. The rank's `DeltaEncoder` sends a request's first output whole and then only what is new:
the new token ids, text and logprobs, the prompt (and its logprobs, once scored) never twice. The front end's
`DeltaDecoder` adds them up and hands out cumulative outputs again, each with lists of its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from twinbatch.outputs import CompletionOutput, RequestOutput


@dataclass
class _Sent:
    tokens: int = 0
    chars: int = 0
    logprobs: int = 0
    prompt_logprobs: bool = False


class DeltaEncoder:
    """On the rank: each output as the delta since the last one sent for its request."""

    def __init__(self) -> None:
        self.sent: dict[str, _Sent] = {}

    def encode(self, out: RequestOutput) -> RequestOutput:
        c = out.outputs[0]
        sent = self.sent.get(out.request_id)
        if out.finished:
            self.sent.pop(out.request_id, None)
        else:
            self.sent[out.request_id] = _Sent(len(c.token_ids), len(c.text), len(c.logprobs or ()),
                                              out.prompt_logprobs is not None)  # fmt: skip
        if sent is None:
            return out
        logprobs = c.logprobs[sent.logprobs :] if c.logprobs is not None else None
        delta = dataclasses.replace(c, text=c.text[sent.chars :], token_ids=c.token_ids[sent.tokens :],
                                    logprobs=logprobs)  # fmt: skip
        prompt_logprobs = None if sent.prompt_logprobs else out.prompt_logprobs
        return dataclasses.replace(out, prompt=None, prompt_token_ids=[], outputs=[delta],
                                   prompt_logprobs=prompt_logprobs)  # fmt: skip

    def forget(self, request_id: str) -> None:
        """An aborted request: it sends nothing more."""
        self.sent.pop(request_id, None)


class DeltaDecoder:
    """On the front end: deltas added up into cumulative outputs."""

    def __init__(self) -> None:
        self.partial: dict[str, RequestOutput] = {}

    def decode(self, delta: RequestOutput) -> RequestOutput:
        total = self.partial.get(delta.request_id)
        if total is None:
            total = delta
        else:
            c, d = total.outputs[0], delta.outputs[0]
            logprobs = None if c.logprobs is None else c.logprobs + (d.logprobs or [])
            completion = CompletionOutput(c.index, c.text + d.text, c.token_ids + d.token_ids, d.finish_reason,
                                          d.stop_reason, logprobs)  # fmt: skip
            total = dataclasses.replace(delta, prompt=total.prompt, prompt_token_ids=total.prompt_token_ids,
                                        outputs=[completion],
                                        prompt_logprobs=delta.prompt_logprobs or total.prompt_logprobs)  # fmt: skip
        if total.finished:
            self.partial.pop(delta.request_id, None)
        else:
            self.partial[delta.request_id] = total
        return total

    def forget(self, request_id: str) -> None:
        """An aborted request: its partial output goes."""
        self.partial.pop(request_id, None)
