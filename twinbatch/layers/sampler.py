"""Greedy, temperature, top-k and top-p sampling, with an optional seed per request; log-probabilities."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from twinbatch.sampling_params import SamplingParams


def _apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [vocab] -> logits with the tokens outside top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> torch.Tensor:
    """logits [num_rows, vocab] float32 -> one token id per row, [num_rows] int64 on the logits' device, with no
    host synchronisation (asynchronous scheduling reads it a step later).

    Random rows use the exponential-race form of categorical sampling: argmax(p / E), E ~ Exp(1), drawn from
    the request's own generator when it has a seed.
    """
    tokens = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            probs = _apply_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p).softmax(-1)
            noise = torch.empty_like(probs).exponential_(generator=generators[i] or default_generator)
            tokens[i] = (probs / noise).argmax()
    return tokens


@dataclass
class LogprobsTensors:
    """vLLM's layout: column 0 is the scored token (sampled, or the next prompt token), then the top-k."""

    logprob_token_ids: torch.Tensor  # [num_rows, 1 + k] int64
    logprobs: torch.Tensor  # [num_rows, 1 + k] float32
    selected_token_ranks: torch.Tensor  # [num_rows] int64: 1 + the number of tokens more likely than column 0's

    @staticmethod
    def cat(parts: list[LogprobsTensors]) -> LogprobsTensors:
        fields = dataclasses.fields(LogprobsTensors)
        return LogprobsTensors(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields))

    def to_host(self) -> LogprobsTensors:
        """Starts copying to the host without waiting for the device."""
        return LogprobsTensors(*(getattr(self, f.name).to("cpu", non_blocking=True) for f in dataclasses.fields(self)))

    def __getitem__(self, rows: slice) -> LogprobsTensors:
        return LogprobsTensors(self.logprob_token_ids[rows], self.logprobs[rows], self.selected_token_ranks[rows])


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_logprobs: int) -> LogprobsTensors:
    """logits [num_rows, vocab] float32 (the model's raw output, before temperature or top-k/top-p, as in
    vLLM), token_ids [num_rows] -> each token's log-probability and rank, and the top num_logprobs."""
    logprobs = logits.log_softmax(-1)
    chosen = logprobs.gather(-1, token_ids[:, None])  # [num_rows, 1]
    ranks = (logprobs > chosen).sum(-1) + 1
    top = logprobs.topk(num_logprobs, dim=-1)
    return LogprobsTensors(torch.cat([token_ids[:, None], top.indices], 1), torch.cat([chosen, top.values], 1), ranks)
