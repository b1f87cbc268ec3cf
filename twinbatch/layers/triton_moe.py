"""Fused routed experts in Triton, in the style of vLLM's fused_moe: the (token, slot) pairs sorted by expert
and each expert's run padded to a multiple of BLOCK_M, then two grouped GEMMs in which every BLOCK_M-row tile
belongs to one expert and reads only that expert's weights.

1. `align_block_size` (torch ops, no host synchronisation, compiled with the layer): pair ids sorted by expert
   into a buffer of num_pairs + E * (BLOCK_M - 1) rows, a host-known bound on the padded length, so every grid
   is sized from shapes alone and a step can be captured in a CUDA graph; padding rows hold num_pairs, tiles
   past the real end hold expert E and exit at once.
2. `_gate_up_kernel`: x[token of each row] @ gate_up[e]^T with SiLU(gate) * up fused in the epilogue, gate and
   up columns of the same output tile in one program -> intermediate [padded rows, I].
3. `_down_kernel`: intermediate @ down[e]^T times the routing weight, each row stored to its own (token, slot)
   row; the k-way sum is a fixed-order torch sum (compiled with the layer). No atomics: the result is
   bit-identical from run to run.

Only the two kernel launches are opaque to torch.compile; the align step and the sum are ordinary torch code,
so Inductor fuses them with the routing around them instead of launching a dozen small kernels eagerly.

Imported only when moe_backend is "triton" (EngineConfig refuses that backend where Triton cannot run).
Under TRITON_INTERPRET=1, set before this module is imported, the kernels run on CPU in Triton's interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from twinbatch.compilation import opaque
from twinbatch.ops import sort_by_expert, sum_rows

# Rows per tile of the align step, for every batch size: block_m may not depend on the batch inside compiled
# code (a threshold on it would be a guard, and crossing it while serving a recompilation). 64 is the measured
# best where it matters most (below); at a few rows per expert the padding costs tensor-core work the weight
# reads hide, and tiles past the real end exit at once.
ALIGN_M = 64


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def tiles_for(pairs_per_expert: float, dtype: torch.dtype) -> Tiles:
    """pairs_per_expert counts other ranks' pairs too (under expert parallelism about half of them or more).
    Decode (up to 128): 64 x 64 x 64 tiles, 4 warps, 3 stages, the best of the shapes measured for DP=2 decode
    (docs/performance.md, kernel choices); a 32-row tile would read an expert's weights twice there. Prefill:
    64 x 128 tiles, 8 warps. Shared memory per stage: x [M, K] plus gate and up [K, N] tiles; float32 halves
    BLOCK_K."""
    tiles = Tiles(ALIGN_M, 64, 64, 4, 3) if pairs_per_expert <= 128 else Tiles(ALIGN_M, 128, 64, 8, 3)
    if dtype == torch.float32:
        tiles = Tiles(tiles.block_m, tiles.block_n, tiles.block_k // 2, tiles.num_warps, tiles.num_stages)
    return tiles


def align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids [num_tokens, k] -> (rows [num_pairs + E * (block_m - 1), rounded up to block_m] int32: the pair id
    (token * k + slot) at each padded, expert-sorted position, num_pairs for padding; tile_expert [rows / block_m]
    int32: the expert of each block_m-row tile, num_experts past the last one). Ids outside [0, E) get no row."""
    flat = topk_ids.flatten()
    num_pairs, device = flat.shape[0], flat.device
    flat = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order, ends = sort_by_expert(flat, num_experts)  # skipped pairs sort last
    ends = ends.long()
    counts = ends - torch.cat([ends.new_zeros(1), ends[:-1]])
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    padded_end = padded.cumsum(0)
    expert = flat[order]
    local = expert.clamp(max=num_experts - 1)
    rank_in_expert = torch.arange(num_pairs, device=device) - (ends - counts)[local]
    capacity = (num_pairs + num_experts * (block_m - 1) + block_m - 1) // block_m * block_m  # known on the host
    dest = torch.where(expert < num_experts, (padded_end - padded)[local] + rank_in_expert, capacity)
    rows = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)  # skipped: the spare row
    rows[dest] = order.to(torch.int32)
    tile_start = torch.arange(0, capacity, block_m, device=device)
    tile_expert = (padded_end[None, :] <= tile_start[:, None]).sum(1).to(torch.int32)
    return rows[:capacity], tile_expert


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, rows_ptr, tile_expert_ptr, out_ptr,
    num_pairs, top_k, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_or,
    num_experts, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[r, n] = silu(x[t] . w[e, n]) * (x[t] . w[e, inter + n]) for the rows r of one tile (t = pair // top_k);
    padding rows get 0. w [E, 2 * inter, hidden], unit stride along hidden."""
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:
        return
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(rows_ptr + offs_m)
    row_ok = pair < num_pairs
    token = (pair // top_k).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < inter
    kk = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + token[:, None] * stride_xt
    w_gate = w_ptr + expert.to(tl.int64) * stride_we + n[None, :] * stride_wn  # [1, BLOCK_N] column starts
    w_up = w_gate + inter * stride_wn
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + kk
        k_ok = k < hidden
        a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        gate += tl.dot(a, tl.load(w_gate + k[:, None], mask=w_mask, other=0.0), input_precision=PRECISION)
        up += tl.dot(a, tl.load(w_up + k[:, None], mask=w_mask, other=0.0), input_precision=PRECISION)
    act = gate / (1.0 + tl.exp(-gate)) * up
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_or + n[None, :]
    tl.store(out, act.to(out_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr, w_ptr, rows_ptr, tile_expert_ptr, weights_ptr, out_ptr,
    num_pairs, hidden, inter,
    stride_ar, stride_we, stride_wn, stride_op,
    num_experts, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[pair, n] = routing weight of pair * (a[r] . w[e, n]) for the rows r of one tile; padding rows are not
    stored. a [padded rows, inter]; w [E, hidden, inter], unit stride along inter."""
    tile, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:
        return
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(rows_ptr + offs_m)
    row_ok = pair < num_pairs
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    kk = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_ar
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k = k0 + kk
        k_ok = k < inter
        a = tl.load(a_rows + k[None, :], mask=k_ok[None, :], other=0.0)
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(a, w, input_precision=PRECISION)
    acc *= tl.load(weights_ptr + pair, mask=row_ok, other=0.0)[:, None]
    out = out_ptr + pair.to(tl.int64)[:, None] * stride_op + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def fused_experts(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """x [num_tokens, H]; gate_up_proj [E, 2I, H]; down_proj [E, H, I]; topk_weights [num_tokens, k] float32;
    topk_ids [num_tokens, k], ids outside [0, E) skipped. Returns the routing-weighted sum over each token's
    experts, [num_tokens, H]. No host synchronisation."""
    (num_tokens, hidden), num_experts, k = x.shape, gate_up_proj.shape[0], topk_ids.shape[1]
    rows, tile_expert = align_block_size(topk_ids, num_experts, tiles.block_m if tiles else ALIGN_M)
    weights = topk_weights.float().contiguous()
    pairs = _launch(x, gate_up_proj, down_proj, weights, rows, tile_expert, k, tiles)
    keep = ((topk_ids >= 0) & (topk_ids < num_experts))[..., None]  # skipped pairs' rows were never written
    return sum_rows(torch.where(keep, pairs.view(num_tokens, k, hidden), 0.0))  # fixed order: deterministic


@opaque
def _launch(
    x: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    weights: torch.Tensor,
    rows: torch.Tensor,
    tile_expert: torch.Tensor,
    k: int,
    tiles: Tiles | None,
) -> torch.Tensor:
    """The two kernels -> pairs [num_tokens * k, H]: each local pair's weighted expert output in its own row."""
    (num_tokens, hidden), (num_experts, inter2, _) = x.shape, gate_up_proj.shape
    inter, num_pairs = inter2 // 2, num_tokens * k
    assert x.stride(-1) == gate_up_proj.stride(-1) == down_proj.stride(-1) == 1 and x.dtype == gate_up_proj.dtype
    tiles = tiles or tiles_for(num_pairs / num_experts, x.dtype)
    assert rows.shape[0] == tile_expert.shape[0] * tiles.block_m, "the align step's block_m is not the tiles'"
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # bf16 operands: exact products either way
    meta = {"num_experts": num_experts, "BLOCK_M": tiles.block_m, "BLOCK_N": tiles.block_n,
            "BLOCK_K": tiles.block_k, "PRECISION": precision, "num_warps": tiles.num_warps,
            "num_stages": tiles.num_stages}  # fmt: skip
    act = x.new_empty(rows.shape[0], inter)  # rows of tiles past the real end are neither written nor read
    _gate_up_kernel[(tile_expert.shape[0], triton.cdiv(inter, tiles.block_n))](
        x, gate_up_proj, rows, tile_expert, act, num_pairs, k, hidden, inter,
        x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), act.stride(0), **meta,
    )  # fmt: skip
    pairs = x.new_empty(num_pairs, hidden)
    _down_kernel[(tile_expert.shape[0], triton.cdiv(hidden, tiles.block_n))](
        act, down_proj, rows, tile_expert, weights, pairs, num_pairs, hidden, inter,
        act.stride(0), down_proj.stride(0), down_proj.stride(1), pairs.stride(0), **meta,
    )  # fmt: skip
    return pairs
