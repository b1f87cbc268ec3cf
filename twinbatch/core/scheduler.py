"""Continuous batching with chunked prefill and preemption by recomputation.

Each step has a token budget (max_num_batched_tokens). Running requests are served first: every decode (one
token), oldest first, then the running prefills, each taking a chunk of what budget is left; then waiting
requests join while budget, max_num_seqs and KV blocks allow. So a running decode waits for no prefill: it gets
its token in every step (unless preempted), and a step that also prefills holds at most the budget's tokens,
which bounds how much longer that step takes than a decode-only one. A smaller budget lowers that bound (the
inter-token latency of running requests while others prefill) and raises the time to first token of long
prompts, whose prefill then takes more steps (docs/serving.md, scheduling).

When a running request needs a block and none is free, the newest running request not yet scheduled in this
step is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later from
its prompt and the tokens it has generated so far.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from twinbatch.config import SchedulerConfig
from twinbatch.core.block_manager import BlockManager
from twinbatch.core.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def completes_prefill(self) -> bool:
        """True when this step computes the request's last known token, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens

    @property
    def prompt_logprob_positions(self) -> range:
        """Positions computed this step whose logits score a prompt token not scored yet (position p scores
        token p + 1), for a request that asks for prompt logprobs. A recomputation after preemption skips
        the ones already scored."""
        req = self.request
        if req.prompt_logprobs is None:
            return range(0)
        lo = max(req.num_computed_tokens, len(req.prompt_logprobs) - 1)
        return range(lo, max(lo, min(req.num_computed_tokens + self.num_new_tokens, len(req.prompt_token_ids) - 1)))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_context_tokens(self) -> int:
        """Cache entries the step's attention reads: every request's context, its new tokens included."""
        return sum(s.request.num_computed_tokens + s.num_new_tokens for s in self.scheduled)

    @property
    def decode_only(self) -> bool:
        """Every request takes one token (an empty batch too): a decode step."""
        return all(s.num_new_tokens == 1 for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # ever

    def add_request(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        scheduled: set[str] = set()
        for req in sorted(self.running, key=lambda r: r.num_uncomputed_tokens > 1):  # stable: decodes first
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted in this step to make room for an earlier one
            if req.num_pending and req.at_length_limit(self.config.max_model_len):
                continue  # its token still on the device is its last: it finishes when the token arrives
            n = min(req.num_uncomputed_tokens, budget)
            while not self.block_manager.can_allocate(req, n):
                victim = next(r for r in reversed(self.running) if r.request_id not in scheduled)  # req at worst
                self.running.remove(victim)
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                self.block_manager.allocate(req, n)
                out.scheduled.append(ScheduledRequest(req, n))
                scheduled.add(req.request_id)
                budget -= n
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_uncomputed_tokens, budget)
            if not self.block_manager.can_allocate(req, n):
                break
            self.waiting.popleft()
            self.block_manager.allocate(req, n)
            req.status = RequestStatus.RUNNING
            req.scheduled_time = req.scheduled_time or time.monotonic()
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)
        out.preempted.append(req)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Marks the scheduled tokens as computed (their KV is now in the cache)."""
        for s in out.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens

    def finish(self, req: Request, reason: str) -> None:
        """Ends a request (stop, length, abort or error) and returns its blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.block_manager.free(req)
