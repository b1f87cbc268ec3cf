"""Paged attention over a block-table KV cache: per-step metadata and the reference (any-device) kernel.

KV cache layout, one tensor per layer: [num_blocks, block_size, *entry_shape]. Token slot s lives in block
s // block_size at offset s % block_size. Block 0 is never given to a request: padding tokens write there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from twinbatch.compilation import opaque
from twinbatch.config.model import ModelConfig

PADDING_SLOT = 0


@dataclass
class AttentionMetadata:
    """What attention needs to know about one forward pass; requests are packed back to back."""

    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, token offset of each request's new tokens
    seq_lens: torch.Tensor  # [num_reqs] int32, tokens in the cache after this pass (context + new)
    block_tables: torch.Tensor  # [num_reqs, max_blocks_per_req] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64, where each new token's KV is written
    block_size: int
    decode_only: bool = False  # every request has exactly one new token: token i belongs to request i
    max_seq_len: int = 0  # an upper bound of seq_lens, known on the host (sizes the batched kernels)
    # > 0: prefill attention takes the packed path (no host reads, so a CUDA graph can hold it); bounds the sum
    # of seq_lens, which is the number of cache entries it gathers
    context_bound: int = 0

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @cached_property
    def host(self) -> tuple[list[int], list[int]]:
        """(query_start_loc, seq_lens) as Python lists, for the reference kernel's loop."""
        return self.query_start_loc.tolist(), self.seq_lens.tolist()

    @cached_property
    def split(self) -> tuple[Decodes | None, Prefills | None]:
        """A prefill or mixed step's decodes and other requests, worked out once a step for every layer."""
        decodes = decodes_of(self)
        return decodes, prefills_of(self, decodes)


@opaque  # compiled, the write into a view of the cache became a copy of the whole cache
def write_kv(cache: torch.Tensor, slot_mapping: torch.Tensor, entries: torch.Tensor) -> None:
    """cache [num_blocks, block_size, *E] <- entries [num_tokens, *E] at slot_mapping."""
    cache.view(-1, *cache.shape[2:])[slot_mapping] = entries.to(cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len entries of one request: [seq_len, *E]."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


ExpandKV = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Decodes:
    """The requests of a mixed step that have one new token: a decode kernel serves them together."""

    requests: frozenset[int]  # their indices in the step
    rows: torch.Tensor  # [n] int64, their token rows
    meta: AttentionMetadata  # decode-only metadata of theirs alone


@dataclass
class Prefills:
    """The requests of a prefill or mixed step with more than one new token, for one packed attention."""

    rows: torch.Tensor  # [n] int64, their token rows
    meta: AttentionMetadata  # their metadata alone, in the packed layout bounded by their contexts' sum


def prefills_of(meta: AttentionMetadata, decodes: Decodes | None) -> Prefills | None:
    """The requests with new tokens that are not decodes, or None. Reads the host offsets."""
    starts, seq_lens = meta.host
    skip = decodes.requests if decodes else frozenset()
    requests = [i for i in range(len(seq_lens)) if starts[i + 1] > starts[i] and i not in skip]
    if not requests:
        return None
    device = meta.seq_lens.device
    rows = torch.tensor([t for i in requests for t in range(starts[i], starts[i + 1])], device=device)
    cu_q = [0]
    for i in requests:
        cu_q.append(cu_q[-1] + starts[i + 1] - starts[i])
    index = torch.tensor(requests, device=device)
    sub = AttentionMetadata(
        query_start_loc=torch.tensor(cu_q, dtype=meta.query_start_loc.dtype, device=device),
        seq_lens=meta.seq_lens[index], block_tables=meta.block_tables[index], slot_mapping=meta.slot_mapping[rows],
        block_size=meta.block_size, max_seq_len=max(seq_lens[i] for i in requests),
        context_bound=sum(seq_lens[i] for i in requests),
    )  # fmt: skip
    return Prefills(rows, sub)


def decodes_of(meta: AttentionMetadata) -> Decodes | None:
    """The one-new-token requests of a prefill or mixed step, or None. Reads the host offsets, which the
    reference loop reads anyway. A one-token query at the end of its sequence is exactly a decode, whether
    it continues a generation or ends a prefill chunk."""
    starts, seq_lens = meta.host
    requests = [i for i in range(len(seq_lens)) if starts[i + 1] - starts[i] == 1]
    if not requests:
        return None
    index = torch.tensor(requests, device=meta.seq_lens.device)
    rows = meta.query_start_loc[index].long()
    sub = AttentionMetadata(
        query_start_loc=torch.arange(len(requests) + 1, dtype=meta.query_start_loc.dtype, device=index.device),
        seq_lens=meta.seq_lens[index], block_tables=meta.block_tables[index], slot_mapping=meta.slot_mapping[rows],
        block_size=meta.block_size, decode_only=True, max_seq_len=max(seq_lens[i] for i in requests),
    )  # fmt: skip
    return Decodes(frozenset(requests), rows, sub)


DecodeFn = Callable[[torch.Tensor, AttentionMetadata], torch.Tensor]


def paged_attention_reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    expand_kv: ExpandKV,
    scale: float,
    v_dim: int,
    decode: DecodeFn | None = None,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its cached context.

    q: [num_tokens, num_heads, qk_dim]; expand_kv turns gathered cache entries [seq_len, *E] into
    k [seq_len, num_kv_heads, qk_dim] and v [seq_len, num_kv_heads, v_dim]. Returns [num_tokens, num_heads, v_dim].
    With `decode` (a prefill or mixed step on a fast backend) there is no loop either: the requests with one new
    token go to decode(their token rows, their decode-only metadata) -> [rows, num_heads, v_dim] together, the
    others to one packed_attention over their contexts, so an eager step issues the same kernels a layer whatever
    its number of requests (the loop cost some 0.6 ms of host time a request a layer on GPU). With
    meta.context_bound it is packed_attention over every request: no host reads.
    """
    if meta.context_bound:
        return packed_attention(q, cache, meta, expand_kv, scale, v_dim)
    out = q.new_zeros(q.shape[0], q.shape[1], v_dim)  # padding tokens attend to nothing
    if decode is not None:
        decodes, prefills = meta.split
        if prefills:
            out[prefills.rows] = packed_attention(q[prefills.rows], cache, prefills.meta, expand_kv, scale, v_dim)
        if decodes:
            out[decodes.rows] = decode(decodes.rows, decodes.meta)
        return out
    starts, seq_lens = meta.host
    for i, seq_len in enumerate(seq_lens):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        k, v = expand_kv(gather_kv(cache, meta.block_tables[i], seq_len))
        # causal with the queries at the end of the sequence; a bias object, not a mask tensor, so SDPA may use its
        # fused kernels (a materialised mask forces the float32 math path on GPU). The fused kernels also take only
        # 4-d inputs [batch, heads, seq, dim]: with 3-d ones SDPA falls back to the math path as well
        mask = causal_lower_right(hi - lo, seq_len) if hi - lo < seq_len else None
        if mask is not None and v_dim < q.shape[-1]:  # the lower-right kernel (flash) needs equal head dims;
            v = F.pad(v, (0, q.shape[-1] - v_dim))  # without, MLA's 192/128 took the math path
        o = F.scaled_dot_product_attention(
            q[lo:hi].transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            scale=scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        out[lo:hi] = o[0, ..., :v_dim].transpose(0, 1)
    return out


def gather_batched(cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Every request's cache entries, padded: ([num_reqs, S, *E], key-valid mask [num_reqs, S]); S is
    max_seq_len rounded up to whole blocks. One gather, no host synchronisation. Entries past a request's
    length are zeroed: unwritten cache memory may hold NaN, and 0 * NaN would leak through the softmax."""
    bs = cache.shape[1]
    num_blocks = -(-meta.max_seq_len // bs)
    blocks = meta.block_tables[:, :num_blocks].long()  # [num_reqs, num_blocks]
    entries = cache[blocks].flatten(1, 2)  # [num_reqs, num_blocks * bs, *E]
    positions = torch.arange(num_blocks * bs, device=cache.device)
    valid = positions[None, :] < meta.seq_lens[:, None].long()
    mask = valid.view(*valid.shape, *[1] * (entries.dim() - 2))
    return entries.masked_fill(~mask, 0), valid


def packed_context(cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Every request's first seq_len cache entries, back to back in a fixed [context_bound, *E] buffer, and
    their offsets cu_seq_k [num_reqs + 1]; no host reads. Rows past the last request are zeros."""
    bound, bs = meta.context_bound, cache.shape[1]
    cu_k = F.pad(meta.seq_lens.long().cumsum(0), (1, 0))  # [num_reqs + 1]
    req, offset = _request_of_rows(cu_k, bound)
    valid = req < meta.num_reqs
    req = req.clamp(max=meta.num_reqs - 1)
    block = meta.block_tables[req, (offset // bs).clamp(max=meta.block_tables.shape[1] - 1)].long()
    slot = torch.where(valid, block * bs + offset % bs, PADDING_SLOT)
    entries = cache.view(-1, *cache.shape[2:])[slot]
    return entries.masked_fill(~valid.view(-1, *[1] * (entries.dim() - 1)), 0), cu_k


def packed_attention(
    q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, expand_kv: ExpandKV, scale: float, v_dim: int
) -> torch.Tensor:
    """paged_attention_reference without the loop: the requests' contexts are gathered into one buffer of
    meta.context_bound rows and attended with variable-length attention (flash on CUDA). Shapes depend only
    on the token count, context_bound and the number of request rows, so a CUDA graph can hold it; requests
    may have no tokens (padding rows of the graph) and padding tokens get 0."""
    if meta.num_reqs == 0:
        return q.new_zeros(q.shape[0], q.shape[1], v_dim)
    entries, cu_k = packed_context(cache, meta)
    k, v = expand_kv(entries)  # [context_bound, kv_heads, qk_dim], [context_bound, kv_heads, v_dim]
    cu_q = meta.query_start_loc.long()
    attend = _varlen_flash if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else _varlen_masked
    out = attend(q, k.to(q.dtype), v.to(q.dtype), cu_q, cu_k, scale)[..., :v_dim]
    real = torch.arange(q.shape[0], device=q.device) < cu_q[-1]
    return out.masked_fill(~real[:, None, None], 0)


def _varlen_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  scale: float) -> torch.Tensor:  # fmt: skip
    """Causal (bottom-right) variable-length flash attention; v padded to the qk head dim, which flash needs.
    The maxima are the buffers' sizes: bounds the host knows, not the actual lengths."""
    from torch.nn.attention.varlen import varlen_attn

    if v.shape[-1] < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    return varlen_attn(q, k, v, cu_q.int(), cu_k.int(), q.shape[0], k.shape[0], scale=scale, window_size=(-1, 0))


def _varlen_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                   scale: float) -> torch.Tensor:  # fmt: skip
    """The same on any device and dtype (flash takes only 16-bit ones), as one SDPA over
    [num_tokens, context_bound] with a block-causal mask."""
    q_req, q_idx = _request_of_rows(cu_q, q.shape[0])
    k_req, k_idx = _request_of_rows(cu_k, k.shape[0])
    lens_q, lens_k = cu_q.diff(), cu_k.diff()
    shift = (lens_k - lens_q)[q_req.clamp(max=lens_q.shape[0] - 1)]  # queries sit at the end of their sequence
    mask = (q_req[:, None] == k_req[None, :]) & (k_idx[None, :] <= (q_idx + shift)[:, None])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
        scale=scale, enable_gqa=k.shape[1] != q.shape[1],
    )  # fmt: skip
    return out.transpose(0, 1).nan_to_num(0.0)  # a row with no key is NaN; the caller zeroes padding rows


def _request_of_rows(cu: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [0, n) of requests packed back to back at offsets cu [num_reqs + 1] -> (each row's request, its
    index within it); empty requests own no row, rows past the end get num_reqs."""
    row = torch.arange(n, device=cu.device)
    req = torch.searchsorted(cu, row, right=True) - 1
    return req, row - cu[req.clamp(max=cu.shape[0] - 2)]


class PagedAttention(nn.Module):
    """What every attention layer holds besides its weights: the model config, the shared rotary embedding, the
    kernels of decode steps and its slice of the paged KV cache, [num_blocks, block_size, *cache_entry_shape]."""

    def __init__(
        self, cfg: ModelConfig, rotary: nn.Module, backend: str = "reference", cache_blocks: tuple[int, int] = (0, 0)
    ) -> None:
        super().__init__()
        self.cfg, self.rotary = cfg, rotary
        self.decode_backend = backend  # "reference", or the kernels of decode steps: "batched", "triton"
        self.kv_cache = torch.empty(*cache_blocks, *self.cache_entry_shape(cfg))  # read only where written

    @staticmethod
    def cache_entry_shape(cfg: ModelConfig) -> tuple[int, ...]:
        raise NotImplementedError
