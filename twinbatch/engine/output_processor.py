"""Detokenization and stop strings in the front end, as vLLM's OutputProcessor: the engine processes send token
ids, and the process that serves HTTP turns them into text.

The ranks run their engines with `detokenize=False`: their outputs carry tokens, logprobs and the stops that need
no text (eos, stop token ids, max_tokens, max_model_len). Here each request's IncrementalDetokenizer adds the
text and looks for its stop strings. A stop string ends the request here, on the token that completes it, as the
engine would have ended it in process: the output keeps that token and the text stops before the string. The
rank has already run on (a step or two, until the abort reaches it); what it sends for the request afterwards is
dropped by the caller. Where the engine stopped on the same token for eos or a stop token id, its reason wins, as
in process (LLMEngine._check_stop checks those first).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twinbatch.core.detokenizer import IncrementalDetokenizer
from twinbatch.outputs import RequestOutput
from twinbatch.sampling_params import SamplingParams


class OutputProcessor:
    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add_request(self, request_id: str, params: SamplingParams) -> None:
        self.detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens,
                                                               params.stop_strings)  # fmt: skip

    def forget(self, request_id: str) -> None:
        self.detokenizers.pop(request_id, None)

    def process(self, out: RequestOutput) -> tuple[RequestOutput, bool]:
        """A rank's cumulative output -> (the output with its text, whether a stop string ended it here). The
        run-time metrics the rank sends with each output of a request that has stop strings are kept on the
        last output only."""
        detokenizer = self.detokenizers.get(out.request_id)
        if detokenizer is None or out.error is not None:
            self.forget(out.request_id)
            return out, False
        c = out.outputs[0]
        new = c.token_ids[len(detokenizer.token_ids) :]
        stopped = False
        for i, token in enumerate(new):
            stop = detokenizer.add_token(token)
            if stop is None:
                continue
            if not (out.finished and c.finish_reason == "stop" and i == len(new) - 1):
                keep = len(detokenizer.token_ids)
                logprobs = c.logprobs[:keep] if c.logprobs is not None else None
                c = dataclasses.replace(c, token_ids=c.token_ids[:keep], logprobs=logprobs, finish_reason="stop",
                                        stop_reason=stop)  # fmt: skip
                stopped = not out.finished
                out = dataclasses.replace(out, finished=True)
            break
        c = dataclasses.replace(c, text=detokenizer.final_text(out.finished))
        if out.finished:
            self.forget(out.request_id)
        return dataclasses.replace(out, outputs=[c], metrics=out.metrics if out.finished else None), stopped
