"""Mixture-of-experts: the router (DeepSeek V2/V3 and Qwen3 top-k methods), the experts, and the MoE block."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from twinbatch.compilation import opaque
from twinbatch.config.model import ModelConfig
from twinbatch.distributed.all2all import All2AllBackend, Handle
from twinbatch.layers.forward_context import ExpertGroup, ForwardContext
from twinbatch.layers.mlp import MLP
from twinbatch.ops import RANK_SORT_MAX_PAIRS, sort_by_expert, sum_rows


@dataclass(frozen=True)
class ExpertPlacement:
    """Which routed experts this process holds: the rank-th contiguous 1/size of them. With an all-to-all
    backend (one instance, shared by every MoE layer), tokens reach them through it; without one, all experts
    are local."""

    rank: int = 0
    size: int = 1
    all2all: All2AllBackend | None = None


class Router(nn.Module):
    """Scores experts in float32 (the checkpoint's gate weight is kept in float32, as in Hugging Face)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, dtype=torch.float32))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [num_tokens, hidden] -> (topk_weights [num_tokens, k] float32, topk_ids [num_tokens, k] int64)."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if cfg.topk_method == "noaux_tc":
            choice = scores + self.e_score_correction_bias
            group_scores = self._grouped(choice).topk(2, dim=-1).values.sum(dim=-1)
            choice = self._mask_groups(choice, group_scores, float("-inf"))
            topk_ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
            topk_weights = scores.gather(1, topk_ids)
        else:
            if cfg.topk_method == "group_limited_greedy":
                scores = self._mask_groups(scores, self._grouped(scores).amax(dim=-1), 0.0)
            topk_weights, topk_ids = scores.topk(cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_weights * cfg.routed_scaling_factor, topk_ids

    def _grouped(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.view(scores.shape[0], self.cfg.n_group, -1)  # [num_tokens, n_group, experts_per_group]

    def _mask_groups(self, scores: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        """Keeps the experts of each token's topk_group best groups; the rest get `fill`."""
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(self.cfg.topk_group, dim=-1).indices, True)
        keep = keep[:, :, None].expand(-1, -1, scores.shape[1] // self.cfg.n_group).reshape(scores.shape)
        return scores.masked_fill(~keep, fill)


class Experts(nn.Module):
    """The routed experts of one layer, packed: gate_up_proj [E, 2 * I, H] and down_proj [E, H, I].

    Checkpoints with one tensor per expert are packed into this layout by the loader.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, expert_offset: int = 0,
        backend: str = "reference",
    ) -> None:  # fmt: skip
        super().__init__()
        self.num_experts = num_experts  # held here: global ids expert_offset .. expert_offset + num_experts - 1
        self.expert_offset = expert_offset
        self.backend = backend  # config.MOE_BACKENDS
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, group: ExpertGroup | None = None
    ) -> torch.Tensor:
        """x [num_tokens, H]; topk_ids [num_tokens, k] local ids, those outside [0, num_experts) are skipped.
        Returns the routing-weighted sum over each token's experts, [num_tokens, H]. With `group` (lo, hi), only
        local experts lo .. hi - 1 compute (their weights alone are read) and every other id is skipped: one round
        of SBO."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if group is not None and group[1] - group[0] < self.num_experts:
            lo, hi = group
            ids = topk_ids - lo
            topk_ids = ids.masked_fill((ids < 0) | (ids >= hi - lo), hi - lo)
            gate_up, down = gate_up[lo:hi], down[lo:hi]
        if x.shape[0] and self.backend == "triton" and not self._grouped_is_faster(x, topk_ids):
            from twinbatch.layers import triton_moe  # Triton is optional: imported only on this backend

            return triton_moe.fused_experts(x, gate_up, down, topk_weights, topk_ids)
        grouped = self.backend in ("grouped_mm", "triton")  # triton: its prefill-sized bfloat16 batches
        if x.shape[0] and grouped and (x.device.type == "cpu" or x.dtype == torch.bfloat16):
            return forward_grouped(x, topk_weights, topk_ids, gate_up, down)
        return forward_reference(x, topk_weights, topk_ids, gate_up, down)

    @staticmethod
    def _grouped_is_faster(x: torch.Tensor, topk_ids: torch.Tensor) -> bool:
        """The Triton backend leaves prefill-sized bfloat16 batches to torch._grouped_mm, faster there
        (docs/performance.md, kernel choices). The threshold is the expert sort's, so compiled layers gain no new
        guard, hence no new variant to compile."""
        return x.dtype == torch.bfloat16 and topk_ids.numel() > RANK_SORT_MAX_PAIRS


def forward_grouped(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Two grouped GEMMs over the (token, expert) pairs sorted by expert: no loop, no host synchronisation."""
    num_experts, k, flat = gate_up_proj.shape[0], topk_ids.shape[1], topk_ids.flatten()
    order, offs = sort_by_expert(flat, num_experts)  # skipped ids (>= num_experts) sort last
    tokens = order // k
    gate, up = torch._grouped_mm(x[tokens], gate_up_proj.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down_proj.transpose(1, 2), offs=offs)  # [pairs, H]
    # back to [num_tokens, k] order (gathers, which Inductor fuses with the weighting and the sum) and a
    # fixed-order sum: an index_add_ of k rows per token would add in whatever order GPU atomics run, and the
    # low bits (so greedy ties) would change from run to run
    row = torch.empty_like(order)
    row[order] = torch.arange(order.numel(), device=order.device)  # each pair's row in the sorted order
    keep = (flat < num_experts)[:, None]  # rows past the last group hold garbage, NaN perhaps
    y = torch.where(keep, y[row] * topk_weights.flatten()[:, None], 0.0).view(x.shape[0], k, x.shape[1])
    return sum_rows(y).to(x.dtype)


def forward_reference(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Tokens sorted by expert, one matmul pair per expert that got tokens (reads counts on the host)."""
    num_experts, flat_ids = gate_up_proj.shape[0], topk_ids.flatten()
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids.clamp(0, num_experts), minlength=num_experts + 1)
    token_of = order // topk_ids.shape[1]
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts[:num_experts].tolist()):
        if count:
            rows = order[start : start + count]
            tokens = token_of[start : start + count]
            gate, up = F.linear(x[tokens], gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, down_proj[expert])
            out.index_add_(0, tokens, (y * topk_weights.flatten()[rows, None]).to(x.dtype))
        start += count
    return out


class MoE(nn.Module):
    """Router, routed experts and (DeepSeek) shared experts, with Hugging Face's module names.

    Under expert parallelism: route, launch dispatch, run the shared experts while tokens travel, wait, run
    the local experts, combine. With SBO rounds (ctx.expert_groups) the local experts form that many groups,
    each with its own round trip: every round's dispatch is launched first, then round r's experts compute
    while the later rounds' tokens still travel and round r-1's results travel back. Each expert computes in
    exactly one round, so its weights are read once a step.
    """

    def __init__(
        self, cfg: ModelConfig, placement: ExpertPlacement, backend: str = "reference", layer_idx: int = 0
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # named in errors
        self.gate = Router(cfg)
        num_local = cfg.num_experts // placement.size
        self.experts = Experts(num_local, cfg.hidden_size, cfg.moe_intermediate_size, placement.rank * num_local,
                               backend)  # fmt: skip
        shared = cfg.shared_expert_intermediate_size
        self.shared_experts = MLP(cfg.hidden_size, shared) if shared else None
        self.all2all = placement.all2all

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)
        if self.all2all is None:
            out = self.experts(x, topk_weights, topk_ids)
            return out if self.shared_experts is None else out + self.shared_experts(x)
        if ctx.expert_groups:
            return self._forward_rounds(x, topk_weights, topk_ids, ctx)
        handle = self.all2all.dispatch_launch(x, topk_weights, topk_ids, ctx.max_tokens_across_dp)
        shared = self.shared_experts(x) if self.shared_experts is not None else None  # while tokens travel
        if ctx.ubatch is not None:
            ctx.ubatch.yield_and_switch_from_compute_to_comm()  # the other microbatch computes meanwhile
        recv = self.all2all.dispatch_wait(handle)
        self.all2all.combine_launch(self.experts(recv.x, recv.topk_weights, recv.local_ids), handle)
        if ctx.ubatch is not None:
            ctx.ubatch.yield_and_switch_from_comm_to_compute()
        out = self.all2all.combine_wait(handle)
        return out if shared is None else out + shared

    def _forward_rounds(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """Single-batch overlap: one round trip per group of local experts in ctx.expert_groups.

        Under torch.compile this method runs eagerly (Dynamo gives up on a frame whose loop holds a graph break,
        and every round waits for a collective): it only calls, and each round's tensor work is in a method that
        compiles on its own, as a layer without rounds does."""
        rounds = ctx.expert_groups
        handles = [self._launch_round(x, topk_weights, topk_ids, r, ctx.max_tokens_across_dp) for r in rounds]
        shared = self.shared_experts(x) if self.shared_experts is not None else None  # while tokens travel
        for i, (r, handle) in enumerate(zip(rounds, handles, strict=True)):
            self._compute_round(i, r, handle)
        out = None
        for i, handle in enumerate(handles):  # the rounds' outputs added in round order
            out = self._finish_round(i, handle, out)
        return out if shared is None else out + shared

    def _launch_round(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, r: ExpertGroup, max_tokens: int
    ) -> Handle:
        return self.all2all.dispatch_launch(x, *_round_routing(topk_weights, topk_ids, r, self.all2all), max_tokens)

    def _compute_round(self, i: int, r: ExpertGroup, handle: Handle) -> None:
        _wait_round(self.layer_idx, i, handle)
        recv = self.all2all.dispatch_wait(handle)
        self.all2all.combine_launch(self.experts(recv.x, recv.topk_weights, recv.local_ids, group=r), handle)

    def _finish_round(self, i: int, handle: Handle, out: torch.Tensor | None) -> torch.Tensor:
        _wait_round(self.layer_idx, i, handle)
        combined = self.all2all.combine_wait(handle)
        return combined if out is None else out + combined


def _parse_fault(spec: str | None) -> tuple[int, int] | None:
    """TWINBATCH_SBO_FAULT="L:R" (fault-injection tests): the MoE layer of decoder layer L raises in SBO round R."""
    if not spec:
        return None
    layer, _, round_idx = spec.partition(":")
    if not (layer.isdigit() and round_idx.isdigit()):
        raise ValueError(f"TWINBATCH_SBO_FAULT={spec!r}: use L:R (a decoder layer and a round, from 0)")
    return int(layer), int(round_idx)


SBO_FAULT = _parse_fault(os.environ.get("TWINBATCH_SBO_FAULT"))


@opaque
def _wait_round(layer_idx: int, round_idx: int, handle: Handle) -> None:
    """Waits for a round's collectives in flight (its dispatch, or its combine), where a failed peer or a timeout
    surfaces, with what raises named by layer and round. TWINBATCH_SBO_FAULT makes its round's first wait raise."""
    try:
        if (layer_idx, round_idx) == SBO_FAULT:
            raise RuntimeError("injected fault (TWINBATCH_SBO_FAULT)")
        handle.wait()
    except Exception as e:
        raise RuntimeError(f"SBO round {round_idx} of layer {layer_idx} failed: {type(e).__name__}: {e}") from e


def expert_rounds(num_local: int, num_rounds: int) -> tuple[ExpertGroup, ...]:
    """The local experts cut into num_rounds contiguous groups (lo, hi) of near-equal size (the earlier ones
    larger); none for one round, which is no rounds at all."""
    if num_rounds <= 1:
        return ()
    size, extra = divmod(num_local, num_rounds)
    starts = [r * size + min(r, extra) for r in range(num_rounds + 1)]
    return tuple(itertools.pairwise(starts))


def _round_routing(
    topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: ExpertGroup, all2all: All2AllBackend
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing of one round: each token's choices among the experts of this group on every rank (the same
    local range on each), the others turned into no expert (id num_experts, weight 0), so a token travels to a
    rank in this round only if one of its experts there is in the group."""
    local = topk_ids % all2all.num_local_experts
    mine = (local >= experts[0]) & (local < experts[1])
    return topk_weights.masked_fill(~mine, 0.0), topk_ids.masked_fill(~mine, all2all.num_experts)
