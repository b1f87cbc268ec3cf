"""What the completion and chat endpoints share: model name and prompt checks, sampling parameters (n fanned out
into n engine requests), collecting outputs, token strings for logprobs, and the server-sent-event framing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any

from twinbatch.engine.async_llm import AsyncLLM, EngineDeadError, EngineRequest, QueueFullError
from twinbatch.entrypoints.openai.metrics import ServerMetrics
from twinbatch.entrypoints.openai.protocol import UNSUPPORTED, OpenAIError, SamplingFields, usage
from twinbatch.outputs import Logprob, RequestError, RequestOutput
from twinbatch.sampling_params import INT64_MAX, SamplingParams

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM sends this instead


def engine_error(e: Exception) -> OpenAIError:
    """OpenAIError for the engine's refusals: a full queue is 503, a dead engine 500."""
    if isinstance(e, QueueFullError):
        return OpenAIError(str(e), 503, "ServiceUnavailableError")
    return OpenAIError(str(e), 500, "InternalServerError")


def request_error(error: RequestError) -> OpenAIError:
    if error.bad_input:
        return OpenAIError(error.message)
    return OpenAIError(f"the request failed in the engine: {error.message}", 500, "InternalServerError")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def chunk_usage(req: SamplingFields, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A stream event's usage field: none without include_usage, null with it, the choice's usage so far with
    continuous_usage_stats."""
    if req.continuous_usage:
        return {"usage": usage(prompt_tokens, completion_tokens)}
    return {"usage": None} if req.include_usage else {}


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, model_names: list[str], metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.model_names = model_names
        self.metrics = metrics
        self.max_model_len = engine.config.scheduler.max_model_len
        self.tokenizer = engine.tokenizer  # used on the engine's tokenizer thread only
        self._token_strs: dict[int, str] = {}

    def check_request(self, req: SamplingFields) -> str:
        """Checks what every generating request shares -> the model name for responses. An unknown model is a
        404 naming the served ones, as in vLLM."""
        if req.stream_options is not None and not req.stream:
            raise OpenAIError("stream_options is only allowed with stream: true", param="stream_options")
        if req.seed is not None and req.seed + req.n - 1 > INT64_MAX:
            raise OpenAIError(
                f"seed + n - 1 must be at most 2**63 - 1 (sample j of n uses seed + j); got seed {req.seed}, n {req.n}",
                param="seed",
            )
        return self.check_model(req.model)

    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.model_names[0]
        if model not in self.model_names:
            served = ", ".join(f"`{m}`" for m in self.model_names)
            raise OpenAIError(f"The model `{model}` does not exist; this server serves {served}", 404,
                              "NotFoundError", param="model")  # fmt: skip
        return model

    def process_prompt(
        self, prompt: str | list[int], param: str = "prompt", add_special_tokens: bool = True
    ) -> tuple[str | None, list[int]]:
        try:
            return self.engine.process_input(prompt, add_special_tokens)
        except ValueError as e:
            raise OpenAIError(str(e), param=param) from None

    def max_tokens(self, requested: int | None, prompt_len: int) -> int:
        """The requested number of new tokens (None: as many as fit), checked against max_model_len."""
        if requested is None:
            return self.max_model_len - prompt_len
        if prompt_len + requested > self.max_model_len:
            raise OpenAIError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} in the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                param="max_tokens",
            )
        return requested

    def sampling_params(self, req: SamplingFields, max_tokens: int, sample: int, **extra: Any) -> SamplingParams:
        """The params of sample number `sample` of n; a seeded request's samples get seeds seed, seed+1, ..."""
        unknown = req.model_extra or {}
        for name, offs in UNSUPPORTED.items():
            value = unknown.get(name)
            if name in unknown and value not in offs and not (name == "best_of" and value == req.n):
                allowed = " or ".join(json.dumps(off) for off in offs if off is not None) or "null"
                raise OpenAIError(f"{name} is not supported by twinbatch; leave it out (or at {allowed})", param=name)
        try:
            return SamplingParams(
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, max_tokens=max_tokens,
                seed=None if req.seed is None else req.seed + sample, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
                skip_special_tokens=req.skip_special_tokens, **extra,
            )  # fmt: skip
        except ValueError as e:  # SamplingParams' messages start with the field's name
            field = str(e).split()[0]
            raise OpenAIError(str(e), param=field if field in type(req).model_fields else None) from None

    def admit(self, requests: list[EngineRequest]) -> None:
        """Refuses what could never fit (400), or does not fit now (503), before anything is queued."""
        if len(requests) > self.engine.max_unfinished:
            raise OpenAIError(
                f"this request needs {len(requests)} completions (prompts x n) but the server holds at most "
                f"{self.engine.max_unfinished} at once; send fewer prompts or a smaller n",
                param="n",
            )
        try:
            self.engine.check_admission(len(requests))
        except (QueueFullError, EngineDeadError) as e:
            raise engine_error(e) from None

    async def outputs(self, requests: list[EngineRequest], n: int) -> AsyncIterator[RequestOutput]:
        """The engine's outputs of these requests (n samples of each prompt) as they arrive; engine refusals and
        a request that failed in the engine become OpenAIError (the others of the HTTP request are then aborted)."""
        if self.metrics is not None:
            for i, (request_id, _, params) in enumerate(requests):
                self.metrics.arrived(request_id, params.max_tokens, n if i % n == 0 else 0)
        try:
            async with aclosing(self.engine.generate(requests)) as stream:
                async for out in stream:
                    if self.metrics is not None:
                        self.metrics.observe(out)
                    if out.error is not None:
                        raise request_error(out.error)
                    yield out
        except (QueueFullError, EngineDeadError) as e:
            raise engine_error(e) from None
        finally:
            if self.metrics is not None:
                for request_id, _, _ in requests:
                    self.metrics.forget(request_id)  # those still unfinished

    async def final_outputs(self, requests: list[EngineRequest], n: int) -> dict[str, RequestOutput]:
        final = {}
        async with aclosing(self.outputs(requests, n)) as stream:
            async for out in stream:
                if out.finished:
                    final[out.request_id] = out
        return final

    async def token_strs(self, token_ids: Iterable[int]) -> dict[int, str]:
        """Each token's own text (vLLM's logprob token strings); "token_id:N" for a model without a tokenizer.
        Decoded once per token id, on the tokenizer thread."""
        ids = set(token_ids)
        if self.tokenizer is None:
            return {t: f"token_id:{t}" for t in ids}
        if missing := sorted(ids - self._token_strs.keys()):
            texts = await self.engine.on_tokenizer_thread(self.tokenizer.batch_decode, [[t] for t in missing])
            self._token_strs.update(zip(missing, texts, strict=True))
        return {t: self._token_strs[t] for t in ids}


def logprob_ids(steps: Iterable[dict[int, Logprob] | None]) -> set[int]:
    return {t for step in steps if step is not None for t in step}


async def error_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream that fails after it started ends with an error event and [DONE], as in vLLM."""
    try:
        async with aclosing(events) as stream:
            async for event in stream:
                yield event
    except OpenAIError as e:
        yield sse(e.body())
        yield SSE_DONE
