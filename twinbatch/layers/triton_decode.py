"""Paged decode attention in Triton: one new token per request, read straight from the block-table KV cache.

One kernel serves MLA (weight-absorbed: a single latent "kv head" shared by every query head; keys are
[latent | rope key], values are the latent part of the same tile, so the cache is read once) and GQA (each
kv head serves `group` query heads). Grid (requests, kv heads, splits): split-K over the context
("flash-decoding") so that a few long requests still fill the GPU. Each program walks its slice of the context
BLOCK_N tokens at a time, looking every token's block up in the block table (so BLOCK_N is independent of the
cache's block_size), and keeps an online softmax in fp32 for all query heads of its kv head at once (padded to
>= 16 rows for tl.dot). A second kernel merges the splits by their log-sum-exp; with one split the first
kernel writes the output directly.

Masked loads never touch positions past a request's length, so unwritten cache memory (possibly NaN) never
enters the math. No host synchronisation: the split count comes from host-known shapes and meta.max_seq_len,
so a step can be captured in a CUDA graph.

Imported only when attention_backend is "triton" (EngineConfig refuses that backend where Triton cannot run).
Under TRITON_INTERPRET=1, set before this module is imported, the kernels run on CPU in Triton's interpreter.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from twinbatch.compilation import opaque
from twinbatch.layers.attention import AttentionMetadata

MIN_SPLIT_LEN = 256  # tokens; a split shorter than this costs more in partial writes and merging than it gains
MAX_SPLITS = 128


@triton.jit
def _split_kernel(
    q1_ptr, q2_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    stride_q1r, stride_q1h, stride_q2r, stride_q2h,
    stride_cb, stride_ct, stride_kvh, v_offset, stride_bt,
    stride_or, stride_oh, stride_os, stride_lr, stride_lh,
    scale_log2, group, block_size, split_len,
    D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    V_IS_K1: tl.constexpr, ONE_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Keys are [D1 | D2] at the start of each kv head's entry (D2 = 0: no second part); values are the first
    DV key dims (V_IS_K1) or DV dims at v_offset. Out: [reqs, heads, DV] (ONE_SPLIT) or fp32 partials
    [reqs, heads, splits, DV] plus their base-2 log-sum-exp [reqs, heads, splits]."""
    req, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seq_len)
    rows = tl.arange(0, BLOCK_H)
    heads, row_ok = kvh * group + rows, rows < group
    d1, d2, dv = tl.arange(0, BLOCK_D1), tl.arange(0, BLOCK_D2), tl.arange(0, BLOCK_DV)
    q1 = tl.load(q1_ptr + req * stride_q1r + heads[:, None] * stride_q1h + d1[None, :],
                 mask=row_ok[:, None] & (d1[None, :] < D1), other=0.0)  # fmt: skip
    if D2 > 0:
        q2 = tl.load(q2_ptr + req * stride_q2r + heads[:, None] * stride_q2h + d2[None, :],
                     mask=row_ok[:, None] & (d2[None, :] < D2), other=0.0)  # fmt: skip
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for start in range(lo, hi, BLOCK_N):  # every tile holds at least one valid position
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < hi
        block = tl.load(block_tables_ptr + req * stride_bt + pos // block_size, mask=valid, other=0)
        entry = cache_ptr + block.to(tl.int64) * stride_cb + (pos % block_size) * stride_ct + kvh * stride_kvh
        k1 = tl.load(entry[:, None] + d1[None, :], mask=valid[:, None] & (d1[None, :] < D1), other=0.0)
        s = tl.dot(q1, tl.trans(k1), input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
        if D2 > 0:
            k2 = tl.load(entry[:, None] + D1 + d2[None, :], mask=valid[:, None] & (d2[None, :] < D2), other=0.0)
            s += tl.dot(q2, tl.trans(k2), input_precision=PRECISION)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        if V_IS_K1:
            v = k1
        else:
            v = tl.load(entry[:, None] + v_offset + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty split (a short request) leaves 0, not NaN
    o = acc / l_safe[:, None]
    o_mask = row_ok[:, None] & (dv[None, :] < DV)
    if ONE_SPLIT:
        o_ptrs = out_ptr + req * stride_or + heads[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        o_ptrs = out_ptr + req * stride_or + heads[:, None] * stride_oh + split * stride_os + dv[None, :]
        tl.store(o_ptrs, o, mask=o_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + req * stride_lr + heads * stride_lh + split, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr,
    stride_pr, stride_ph, stride_ps, stride_lr, stride_lh, stride_or, stride_oh,
    num_splits, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """out[req, head] = the splits' partial outputs weighted by their share of the softmax mass."""
    req, head = tl.program_id(0), tl.program_id(1)
    dv = tl.arange(0, BLOCK_DV)
    lse_row, part_row = lse_ptr + req * stride_lr + head * stride_lh, part_ptr + req * stride_pr + head * stride_ph
    m = tl.load(lse_row)  # split 0 always holds tokens: seq_len >= 1
    for s in range(1, num_splits):
        m = tl.maximum(m, tl.load(lse_row + s))
    acc = tl.zeros([BLOCK_DV], tl.float32)
    total = tl.zeros([BLOCK_DV], tl.float32)
    for s in range(num_splits):
        lse = tl.load(lse_row + s)
        w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)  # an empty split weighs 0
        acc += w * tl.load(part_row + s * stride_ps + dv, mask=dv < DV, other=0.0)
        total += w
    tl.store(
        out_ptr + req * stride_or + head * stride_oh + dv, (acc / total).to(out_ptr.dtype.element_ty), mask=dv < DV
    )


@cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def num_splits_for(max_seq_len: int, programs: int, device: torch.device, d_k: int = 0) -> int:
    """One split where the requests alone fill every SM, or for MLA's wide keys (d_k > 256) always (every split
    count above 1 measured slower there). Else about four programs per SM, but no split shorter than
    MIN_SPLIT_LEN tokens (docs/performance.md, kernel choices)."""
    sms = _num_sms(device)
    if programs >= sms or d_k > 256:
        return 1
    return max(1, min(triton.cdiv(4 * sms, programs), triton.cdiv(max_seq_len, MIN_SPLIT_LEN), MAX_SPLITS))


def kernel_config(d_k: int, itemsize: int, splits: int, programs: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages). A key tile [BLOCK_N, d_k] of at most 72 KB, so that two pipeline stages
    fit in shared memory (227 KB on H100/H200); half that for split launches (few requests: more, shorter tiles
    in flight measured faster). MLA (d_k > 256) in 16-bit with fewer programs than SMs: 128-token tiles and 8
    warps, measured faster (docs/performance.md, kernel choices; float32 tiles would be twice the size: not
    measured, so left as they were)."""
    if d_k > 256 and itemsize <= 2 and splits == 1 and programs < _num_sms(device):
        return 128, 8, 2
    budget = (72 if splits == 1 else 36) * 1024
    block_n = max(16, min(64, triton.next_power_of_2(budget // (d_k * itemsize) + 1) // 2))
    return block_n, 4, 2


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every dimension >= 16


def _launch(
    q1: torch.Tensor,
    q2: torch.Tensor | None,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    kv_heads: int,
    kv_head_stride: int,
    v_offset: int | None,
    num_splits: int | None,
) -> torch.Tensor:
    """q1 [reqs, heads, D1] (q2 [reqs, heads, D2]) against the cache; out [reqs, heads, DV]. Inside one cache entry,
    kv head h starts at h * kv_head_stride: keys [D1 | D2], values at v_offset (None: the first DV key dims)."""
    reqs, heads, d1 = q1.shape
    d2, dv = (0 if q2 is None else q2.shape[-1]), out.shape[-1]
    assert meta.max_seq_len > 0 and reqs == meta.num_reqs and q1.dtype == cache.dtype
    assert q1.stride(-1) == 1 and out.stride(-1) == 1 and cache.is_contiguous()
    d_k, programs = _pow2(d1) + (d2 and _pow2(d2)), reqs * kv_heads
    splits = num_splits or num_splits_for(meta.max_seq_len, programs, cache.device, d_k)
    block_n, num_warps, num_stages = kernel_config(d_k, cache.element_size(), splits, programs, cache.device)
    split_len = triton.cdiv(triton.cdiv(meta.max_seq_len, splits), block_n) * block_n
    splits = triton.cdiv(meta.max_seq_len, split_len)  # no split past max_seq_len
    if splits == 1:
        part, lse = out, out  # lse unused
    else:
        part = torch.empty(reqs, heads, splits, dv, dtype=torch.float32, device=q1.device)
        lse = torch.empty(reqs, heads, splits, dtype=torch.float32, device=q1.device)
    q2_ = q1 if q2 is None else q2
    _split_kernel[(reqs, kv_heads, splits)](
        q1, q2_, cache, meta.block_tables, meta.seq_lens, part, lse,
        q1.stride(0), q1.stride(1), q2_.stride(0), q2_.stride(1),
        cache.stride(0), cache.stride(1), kv_head_stride, v_offset or 0, meta.block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2) if splits > 1 else 0, lse.stride(0), lse.stride(1),
        scale * 1.4426950408889634, heads // kv_heads, cache.shape[1], split_len,
        D1=d1, D2=d2, DV=dv, BLOCK_D1=_pow2(d1), BLOCK_D2=_pow2(d2), BLOCK_DV=_pow2(dv),
        BLOCK_H=_pow2(heads // kv_heads), BLOCK_N=block_n, V_IS_K1=v_offset is None, ONE_SPLIT=splits == 1,
        PRECISION="ieee" if q1.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if splits > 1:
        _merge_kernel[(reqs, heads)](
            part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), splits, DV=dv, BLOCK_DV=triton.next_power_of_2(dv),
        )  # fmt: skip
    return out


@opaque
def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode. q_latent [reqs, heads, kv_lora_rank], q_pe [reqs, heads, rope]; cache
    [num_blocks, block_size, kv_lora_rank + rope]. Returns out_latent [reqs, heads, kv_lora_rank]."""
    if out is None:
        out = q_latent.new_empty(q_latent.shape)
    assert cache.shape[-1] == q_latent.shape[-1] + q_pe.shape[-1] and out.shape == q_latent.shape
    return _launch(q_latent, q_pe, cache, meta, scale, out, 1, 0, None, num_splits)


@opaque
def gqa_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """GQA decode. q [reqs, heads, head_dim]; cache [num_blocks, block_size, 2, kv_heads, head_dim] (keys, values).
    Returns out [reqs, heads, head_dim]."""
    if out is None:
        out = q.new_empty(q.shape)
    kv_heads = cache.shape[3]
    assert q.shape[1] % kv_heads == 0 and out.shape == q.shape
    return _launch(q, None, cache, meta, scale, out, kv_heads, cache.stride(3), cache.stride(2), num_splits)
