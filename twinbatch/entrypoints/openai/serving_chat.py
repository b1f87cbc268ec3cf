"""POST /v1/chat/completions: messages through the tokenizer's chat template, streamed as chat.completion.chunk
deltas (the first delta of each choice carries the role) or returned whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from twinbatch.engine.async_llm import EngineRequest
from twinbatch.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage, OpenAIError, now, random_id, usage
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

# For tokenizers without a chat template of their own (the built-in model's): one "role: content" line each.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class OpenAIServingChat(OpenAIServing):
    @property
    def chat_template(self) -> str:
        return getattr(self.tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(
        self, messages: list[ChatMessage], add_generation_prompt: bool, template: str | None = None
    ) -> str:
        if self.tokenizer is None:
            raise OpenAIError("this model has no tokenizer files, so it has no chat template", param="messages")
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(
                conversation, chat_template=template or self.chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )  # fmt: skip
        except Exception as e:  # a template error (jinja2) is the request's fault
            raise OpenAIError(f"the chat template failed: {e}", param="messages") from None

    async def create_chat_completion(self, req: ChatCompletionRequest) -> dict[str, Any] | AsyncIterator[str]:
        model = self.check_request(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
        requests = await self.engine.on_tokenizer_thread(self._requests, req)
        self.admit(requests)
        head = {"id": random_id("chatcmpl"), "created": now(), "model": model}
        if req.stream:
            return error_events(self._stream(req, requests, head | {"object": "chat.completion.chunk"}))
        final = await self.final_outputs(requests, req.n)
        outs = [final[request_id] for request_id, _, _ in requests]
        choices = [await self._choice(req, i, out) for i, out in enumerate(outs)]
        completion_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        body = {"choices": choices, "usage": usage(len(outs[0].prompt_token_ids), completion_tokens)}
        return head | {"object": "chat.completion"} | body

    def _requests(self, req: ChatCompletionRequest) -> list[EngineRequest]:
        """The chat template and tokenization (on the tokenizer thread) -> one engine request per choice."""
        prompt = self.apply_chat_template(req.messages, req.add_generation_prompt, req.chat_template)
        _, token_ids = self.process_prompt(prompt, "messages", add_special_tokens=False)  # the template has BOS
        max_tokens = self.max_tokens(req.max_completion_tokens or req.max_tokens, len(token_ids))
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        base = random_id("chatcmpl")
        return [
            (f"{base}-{j}", {"prompt": prompt, "prompt_token_ids": token_ids},
             self.sampling_params(req, max_tokens, j, logprobs=logprobs))
            for j in range(req.n)
        ]  # fmt: skip

    async def _choice(self, req: ChatCompletionRequest, index: int, out: RequestOutput) -> dict[str, Any]:
        c = out.outputs[0]
        return {
            "index": index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": await self._logprobs(req, c.token_ids, c.logprobs) if req.logprobs else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }

    async def _logprobs(
        self, req: ChatCompletionRequest, token_ids: list[int], steps: list[dict[int, Logprob]] | None
    ) -> dict[str, list]:
        """OpenAI's chat layout: per token its text, bytes, log-probability and the top_logprobs most likely."""
        steps = steps or []
        strs = await self.token_strs([*token_ids, *logprob_ids(steps)])

        def entry(token: int, logprob: float) -> dict[str, Any]:
            return {"token": strs[token], "logprob": clamp(logprob), "bytes": list(strs[token].encode())}

        content = []
        for token, step in zip(token_ids, steps, strict=True):
            top = sorted(step.items(), key=lambda item: item[1].rank)[: req.top_logprobs or 0]
            content.append(
                entry(token, step[token].logprob) | {"top_logprobs": [entry(t, lp.logprob) for t, lp in top]}
            )
        return {"content": content}

    async def _stream(
        self, req: ChatCompletionRequest, requests: list[EngineRequest], head: dict
    ) -> AsyncIterator[str]:
        """A role delta for every choice first, then a content delta per engine output, usage, [DONE]. With
        continuous usage stats, every event carries its choice's usage so far (as vLLM)."""
        index = {request_id: j for j, (request_id, _, _) in enumerate(requests)}
        sent = dict.fromkeys(index, (0, 0))  # per choice: (tokens, characters) sent
        prompt_tokens, completion_tokens = len(requests[0][1]["prompt_token_ids"]), 0
        for j in range(req.n):
            role = {"role": "assistant", "content": ""}
            choice = {"index": j, "delta": role, "logprobs": None, "finish_reason": None}
            yield sse(head | {"choices": [choice]} | chunk_usage(req, prompt_tokens, 0))
        async with aclosing(self.outputs(requests, req.n)) as stream:
            async for out in stream:
                c, (num_tokens, num_chars) = out.outputs[0], sent[out.request_id]
                sent[out.request_id] = (len(c.token_ids), len(c.text))
                new_ids, new_steps = c.token_ids[num_tokens:], (c.logprobs or [])[num_tokens:]
                choice = {
                    "index": index[out.request_id],
                    "delta": {"content": c.text[num_chars:]},
                    "logprobs": await self._logprobs(req, new_ids, new_steps) if req.logprobs else None,
                    "finish_reason": c.finish_reason if out.finished else None,
                }
                if out.finished:
                    choice["stop_reason"] = c.stop_reason
                    completion_tokens += len(c.token_ids)
                yield sse(head | {"choices": [choice]} | chunk_usage(req, prompt_tokens, len(c.token_ids)))
        if req.include_usage:
            yield sse(head | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)})
        yield SSE_DONE
