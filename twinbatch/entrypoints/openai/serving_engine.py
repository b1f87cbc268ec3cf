"""What the completion and chat endpoints share: model name and prompt checks, sampling parameters (n fanned out
into n engine requests), collecting outputs, token strings for logprobs, and the server-sent-event framing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from typing import Any

from twinbatch.engine.async_llm import AsyncLLM, EngineDeadError, EngineRequest, QueueFullError
from twinbatch.entrypoints.openai.metrics import ServerMetrics
from twinbatch.entrypoints.openai.protocol import UNSUPPORTED, OpenAIError, SamplingFields
from twinbatch.outputs import Logprob, RequestOutput
from twinbatch.sampling_params import SamplingParams

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM sends this instead


def engine_error(e: Exception) -> OpenAIError:
    """OpenAIError for the engine's refusals: a full queue is 503, a dead engine 500."""
    if isinstance(e, QueueFullError):
        return OpenAIError(str(e), 503, "ServiceUnavailableError")
    return OpenAIError(str(e), 500, "InternalServerError")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, model_names: list[str], metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.model_names = model_names
        self.metrics = metrics
        self.max_model_len = engine.config.scheduler.max_model_len
        self.tokenizer = engine.tokenizer

    def check_model(self, model: str | None) -> str:
        """-> the model name for responses; an unknown name is a 400 naming the served ones."""
        if model is None:
            return self.model_names[0]
        if model not in self.model_names:
            served = ", ".join(f"`{m}`" for m in self.model_names)
            raise OpenAIError(f"The model `{model}` does not exist; this server serves {served}", param="model")
        return model

    def process_prompt(self, prompt: str | list[int], param: str = "prompt") -> tuple[str | None, list[int]]:
        try:
            return self.engine.process_input(prompt)
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
        for name, off in UNSUPPORTED.items():
            value = (req.model_extra or {}).get(name, off)
            if value != off and not (name == "best_of" and value == req.n):
                raise OpenAIError(f"{name} is not supported by twinbatch; leave it out (or at {off})", param=name)
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

    async def outputs(self, requests: list[EngineRequest]) -> AsyncIterator[RequestOutput]:
        """The engine's outputs of these requests as they arrive; engine refusals become OpenAIError."""
        if self.metrics is not None:
            for request_id, _, _ in requests:
                self.metrics.arrived(request_id)
        try:
            async with aclosing(self.engine.generate(requests)) as stream:
                async for out in stream:
                    if self.metrics is not None:
                        self.metrics.observe(out)
                    yield out
        except (QueueFullError, EngineDeadError) as e:
            raise engine_error(e) from None
        finally:
            if self.metrics is not None:
                for request_id, _, _ in requests:
                    self.metrics.forget(request_id)

    async def final_outputs(self, requests: list[EngineRequest]) -> dict[str, RequestOutput]:
        final = {}
        async with aclosing(self.outputs(requests)) as stream:
            async for out in stream:
                if out.finished:
                    final[out.request_id] = out
        return final

    def token_strs(self, token_ids: Iterable[int]) -> dict[int, str]:
        """Each token's own text (vLLM's logprob token strings); "token_id:N" for a model without a tokenizer."""
        ids = sorted(set(token_ids))
        if self.tokenizer is None:
            return {t: f"token_id:{t}" for t in ids}
        return dict(zip(ids, self.tokenizer.batch_decode([[t] for t in ids]), strict=True))


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
