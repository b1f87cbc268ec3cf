"""POST /v1/completions: prompts as text or token ids, n samples each, echo and logprobs, streamed or whole.

Choice i * n + j is sample j of prompt i. `echo` with `max_tokens: 0` only scores the prompt (as in vLLM): the
engine samples one token, which the response leaves out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from twinbatch.engine.async_llm import EngineRequest
from twinbatch.entrypoints.openai.protocol import CompletionRequest, OpenAIError, now, random_id, usage
from twinbatch.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIServing,
    chunk_usage,
    clamp,
    error_events,
    logprob_ids,
    sse,
)
from twinbatch.outputs import Logprob, RequestOutput


@dataclass
class Choice:
    """One choice's progress: what has been sent of it so far."""

    index: int
    prompt_text: str
    prompt_token_ids: list[int]
    echo_only: bool
    num_tokens: int = 0  # output tokens sent
    text_len: int = 0  # output characters sent
    text_offset: int = 0  # where the next token's text starts (logprobs.text_offset)
    echoed: bool = False


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, req: CompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        model = self.check_request(req)
        if req.max_tokens == 0 and not req.echo:
            raise OpenAIError(
                "max_tokens must be at least 1 (0 only with echo=true, to score the prompt)", param="max_tokens"
            )
        requests, choices = await self.engine.on_tokenizer_thread(self._requests, req)
        self.admit(requests)
        head = {"id": random_id("cmpl"), "object": "text_completion", "created": now(), "model": model}
        if req.stream:
            return error_events(self._stream(req, requests, choices, head))
        final = await self.final_outputs(requests, req.n)
        outs = [final[request_id] for request_id, _, _ in requests]
        body = [await self._choice(req, choices[o.request_id], o) for o in outs]
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outs[:: req.n])
        completion_tokens = sum(0 if choices[o.request_id].echo_only else len(o.outputs[0].token_ids) for o in outs)
        return head | {"choices": body, "usage": usage(prompt_tokens, completion_tokens)}

    def _prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise OpenAIError("prompt is empty; give a string, a list of token ids, or a list of those", param="prompt")
        return list(prompt)

    def _requests(self, req: CompletionRequest) -> tuple[list[EngineRequest], dict[str, Choice]]:
        """Tokenizes and checks every prompt (on the tokenizer thread) -> the engine requests, their choices."""
        base, requests, choices = random_id("cmpl"), [], {}
        echo_only = req.echo and req.max_tokens == 0
        for i, prompt in enumerate(self._prompts(req.prompt)):
            text, token_ids = self.process_prompt(prompt)
            max_tokens = 1 if echo_only else self.max_tokens(req.max_tokens, len(token_ids))
            if req.echo and text is None:
                text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
            for j in range(req.n):
                request_id = f"{base}-{i}-{j}"
                params = self.sampling_params(
                    req, max_tokens, j, logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo else None
                )
                requests.append((request_id, {"prompt": text, "prompt_token_ids": token_ids}, params))
                choices[request_id] = Choice(i * req.n + j, text or "", token_ids, echo_only)
        return requests, choices

    async def _choice(self, req: CompletionRequest, choice: Choice, out: RequestOutput) -> dict[str, Any]:
        """The choice's part of this output that was not sent yet (all of it for a whole response)."""
        c = out.outputs[0]
        text, token_ids, steps = "", [], []
        if not choice.echo_only:
            text, token_ids = c.text[choice.text_len :], c.token_ids[choice.num_tokens :]
            steps = (c.logprobs or [])[choice.num_tokens :]
        choice.num_tokens, choice.text_len = len(c.token_ids), len(c.text)
        if req.echo and not choice.echoed:
            text, token_ids = choice.prompt_text + text, choice.prompt_token_ids + token_ids
            steps = (out.prompt_logprobs or [None] * len(choice.prompt_token_ids)) + steps
            choice.echoed = True
        finish_reason = ("length" if choice.echo_only else c.finish_reason) if out.finished else None
        return {
            "index": choice.index,
            "text": text,
            "logprobs": None if req.logprobs is None else await self._logprobs(choice, token_ids, steps),
            "finish_reason": finish_reason,
            "stop_reason": c.stop_reason if out.finished and not choice.echo_only else None,
        }

    async def _logprobs(
        self, choice: Choice, token_ids: list[int], steps: list[dict[int, Logprob] | None]
    ) -> dict[str, list]:
        """OpenAI's legacy layout: per token its text, log-probability, top alternatives and text offset."""
        strs = await self.token_strs([*token_ids, *logprob_ids(steps)])
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token, step in zip(token_ids, steps, strict=True):
            tokens.append(strs[token])
            token_logprobs.append(None if step is None else clamp(step[token].logprob))
            top_logprobs.append(None if step is None else {strs[t]: clamp(lp.logprob) for t, lp in step.items()})
            text_offset.append(choice.text_offset)
            choice.text_offset += len(strs[token])
        return {
            "text_offset": text_offset,
            "token_logprobs": token_logprobs,
            "tokens": tokens,
            "top_logprobs": top_logprobs,
        }

    async def _stream(
        self, req: CompletionRequest, requests: list[EngineRequest], choices: dict[str, Choice], head: dict
    ) -> AsyncIterator[str]:
        """One event per engine output (one token of one choice), then the usage event, then [DONE]. With
        continuous usage stats, every event carries its choice's usage so far (as vLLM)."""
        prompt_tokens, completion_tokens = 0, 0
        async with aclosing(self.outputs(requests, req.n)) as stream:
            async for out in stream:
                choice = choices[out.request_id]
                num_tokens = 0 if choice.echo_only else len(out.outputs[0].token_ids)
                event = head | {"choices": [await self._choice(req, choice, out)]}
                yield sse(event | chunk_usage(req, len(out.prompt_token_ids), num_tokens))
                if out.finished:
                    prompt_tokens += len(out.prompt_token_ids) if choice.index % req.n == 0 else 0
                    completion_tokens += num_tokens
        if req.include_usage:
            yield sse(head | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield SSE_DONE
