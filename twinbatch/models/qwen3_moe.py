"""Qwen3-MoE grouped-query attention with per-head RMSNorm on queries and keys.

Cache: [num_blocks, block_size, 2, num_kv_heads, head_dim] (keys after norm and rope, then values).
"""

from typing import Any

import torch
from torch import nn

from twinbatch.compilation import opaque
from twinbatch.config.model import ModelConfig
from twinbatch.layers.attention import (
    AttentionMetadata,
    PagedAttention,
    gather_batched,
    paged_attention_reference,
    write_kv,
)
from twinbatch.layers.norm import RMSNorm
from twinbatch.layers.rotary import RotaryEmbedding


class Qwen3MoeAttention(PagedAttention):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, **kernels: Any) -> None:
        super().__init__(cfg, rotary, **kernels)  # PagedAttention: the decode kernels, the KV cache's size
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, heads * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_heads * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_heads * d, bias=False)
        self.o_proj = nn.Linear(heads * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    @staticmethod
    def cache_entry_shape(cfg: ModelConfig) -> tuple[int, ...]:
        return (2, cfg.num_key_value_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cfg, n = self.cfg, x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n, cfg.num_attention_heads, cfg.head_dim))
        k = self.k_norm(self.k_proj(x).view(n, cfg.num_key_value_heads, cfg.head_dim))
        v = self.v_proj(x).view(n, cfg.num_key_value_heads, cfg.head_dim)
        q, k = self.rotary(positions, q, k)
        entries = torch.stack([k, v], dim=1)
        if self.decode_backend != "reference" and meta.decode_only:
            write_kv(self.kv_cache, meta.slot_mapping, entries)
            out = self._decode(q, meta)
        else:
            out = self._prefill(q, entries, meta)
        return self.o_proj(out.flatten(1))

    @opaque  # a loop over the requests, on the host: a compiled layer runs it as written, between its graphs
    def _prefill(self, q: torch.Tensor, entries: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Prefill or mixed: writes the new cache entries, then SDPA per request over its cached context (one
        graph break for both); a mixed step's decodes still take the decode kernel."""
        write_kv(self.kv_cache, meta.slot_mapping, entries)
        decode = (lambda rows, m: self._decode(q[rows], m)) if self.decode_backend != "reference" else None
        head_dim = self.cfg.head_dim
        expand = lambda e: e.to(q.dtype).unbind(1)  # noqa: E731
        return paged_attention_reference(q, self.kv_cache, meta, expand, head_dim**-0.5, head_dim, decode)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self._decode_triton(q, meta) if self.decode_backend == "triton" else self._decode_batched(q, meta)

    def _decode_triton(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The fused paged-KV kernel, reading the cache in place; one token per request, padding tokens get 0."""
        from twinbatch.layers import triton_decode  # Triton is optional: imported only on this backend

        r, out = meta.num_reqs, q.new_zeros(q.shape)
        triton_decode.gqa_decode(q[:r], self.kv_cache, meta, self.cfg.head_dim**-0.5, out=out[:r])
        return out

    def _decode_batched(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """All requests at once over their padded caches; one token per request, padding tokens get 0."""
        cfg, r = self.cfg, meta.num_reqs
        entries, valid = gather_batched(self.kv_cache, meta)  # [reqs, S, 2, kv_heads, head_dim]
        k, v = entries.to(q.dtype).unbind(2)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        qg = q[:r].view(r, cfg.num_key_value_heads, group, cfg.head_dim)  # [reqs, kv_heads, group, head_dim]
        scores = torch.einsum("tkgd,tskd->tkgs", qg, k).float() * cfg.head_dim**-0.5
        probs = scores.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1).to(v.dtype)
        out = q.new_zeros(q.shape[0], cfg.num_attention_heads, cfg.head_dim)
        out[:r] = torch.einsum("tkgs,tskd->tkgd", probs, v).reshape(r, -1, cfg.head_dim)
        return out
