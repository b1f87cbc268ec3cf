"""Greedy, temperature, top-k and top-p sampling, with an optional seed per request; log-probabilities."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from twinbatch.sampling_params import SamplingParams


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [rows, vocab], top_k [rows] (0: off), top_p [rows] -> logits with the tokens outside each row's
    top-k and top-p nucleus set to -inf. One sort for every row."""
    values, order = logits.sort(dim=-1, descending=True)
    kth = values.gather(1, (top_k - 1).clamp(0, logits.shape[-1] - 1)[:, None])  # each row's k-th largest
    values = values.masked_fill((top_k[:, None] > 0) & (values < kth), float("-inf"))
    probs = values.softmax(-1)
    # keep the smallest prefix whose mass reaches top_p; rows with top_p 1 keep everything
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
    return logits.scatter(1, order, values.masked_fill(drop, float("-inf")))


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> torch.Tensor:
    """logits [num_rows, vocab] float32 -> one token id per row, [num_rows] int64 on the logits' device, with no
    host synchronisation (asynchronous scheduling reads it a step later).

    Random rows use the exponential-race form of categorical sampling: argmax(p / E), E ~ Exp(1), drawn from
    the request's own generator when it has a seed (a row at a time), else from the engine's (all at once). The
    random rows are scaled, filtered and drawn together: a fixed number of kernels whatever their number.
    """
    tokens = logits.argmax(dim=-1)
    random = [i for i, p in enumerate(params) if not p.greedy]
    if not random:
        return tokens
    device = logits.device
    rows = torch.tensor(random, device=device)
    picked = [params[i] for i in random]
    scaled = logits[rows] / torch.tensor([p.temperature for p in picked], device=device)[:, None]
    if any(p.top_k > 0 or p.top_p < 1.0 for p in picked):
        top_k = torch.tensor([max(p.top_k, 0) for p in picked], device=device)
        scaled = _apply_top_k_top_p(scaled, top_k, torch.tensor([p.top_p for p in picked], device=device))
    probs = scaled.softmax(-1)
    noise = torch.empty_like(probs)
    seeded = [j for j, i in enumerate(random) if generators[i] is not None]
    if len(seeded) < len(random):
        noise.exponential_(generator=default_generator)
    for j in seeded:
        noise[j].exponential_(generator=generators[random[j]])
    tokens[rows] = (probs / noise).argmax(-1)
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
