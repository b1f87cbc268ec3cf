"""The offline API: `LLM(model=...).generate(prompts, sampling_params)`, as in vLLM."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.engine.dp_client import DPEngineClient
from twinbatch.engine.llm_engine import LLMEngine
from twinbatch.outputs import RequestOutput
from twinbatch.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
Prompt = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        config = EngineArgs.from_kwargs(model=model, **kwargs).create_engine_config()
        if config.parallel.node_rank > 0:
            raise ValueError(
                "node_rank > 0 runs no front end: start it with `twinbatch generate ... --node-rank N`, "
                "which serves this node's DP ranks until node 0 finishes"
            )
        self.llm_engine: LLMEngine | DPEngineClient = (
            DPEngineClient(config) if config.parallel.data_parallel_size > 1 else LLMEngine(config)
        )

    def get_stats(self) -> dict:
        """Engine statistics (per DP rank with data parallelism), including DBO step counts by outcome."""
        return self.llm_engine.get_stats()

    def shutdown(self) -> None:
        """Stops the DP worker processes, if any (also done at exit)."""
        if isinstance(self.llm_engine, DPEngineClient):
            self.llm_engine.shutdown()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt; returns one RequestOutput per prompt, in prompt order.

        All prompts are validated before any is queued, so a bad one raises ValueError and changes nothing. A
        request that fails in the engine alone is returned finished with `error` set (finish_reason "error").
        """
        prompts = _as_prompt_list(prompts)
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        for p in params:
            p.verify()
        for prompt in prompts:
            engine.process_input(prompt)
        ids = [engine.add_request(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            try:
                while len(finished) < len(ids):
                    for out in self.llm_engine.step():
                        if out.error is not None:
                            logger.warning("request %s failed: %s", out.request_id, out.error.message)
                        if out.finished:
                            finished[out.request_id] = out
                            bar.update(1)
            except BaseException:
                for i in ids:
                    self.llm_engine.abort_request(i)
                raise
        return [finished[i] for i in ids]


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str | dict):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a string, a list of token ids, or a list of those; got {prompts!r}")
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # a single list of token ids
    return prompts
