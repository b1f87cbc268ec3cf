"""DeepSeek-V2/V3 multi-head latent attention (MLA).

The cache holds, per token, the compressed latent (after kv_a_layernorm) and the rotated rope key:
[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]. The reference path expands the latent into
per-head keys and values with kv_b_proj when attending.
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
from twinbatch.layers.rotary import RotaryEmbedding, softmax_scale


class DeepseekV2Attention(PagedAttention):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, **kernels: Any) -> None:
        super().__init__(cfg, rotary, **kernels)  # PagedAttention: the decode kernels, the KV cache's size
        heads, self.qk_head_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.scale = softmax_scale(cfg.rope, self.qk_head_dim)

    @staticmethod
    def cache_entry_shape(cfg: ModelConfig) -> tuple[int, ...]:
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim,)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cfg, n = self.cfg, x.shape[0]
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, cfg.num_attention_heads, self.qk_head_dim)  # [num_tokens, heads, nope + rope]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        q_nope, q_pe = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :])
        entries = torch.cat([self.kv_a_layernorm(latent), k_pe[:, 0]], dim=-1)
        if self.decode_backend != "reference" and meta.decode_only:
            write_kv(self.kv_cache, meta.slot_mapping, entries)
            out = self._decode_absorbed(q_nope, q_pe, meta)
        else:
            out = self._prefill(q_nope, q_pe, entries, meta)
        return self.o_proj(out.flatten(1))

    @opaque  # a loop over the requests, on the host: a compiled layer runs it as written, between its graphs
    def _prefill(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, entries: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Prefill or mixed: writes the new cache entries, then SDPA per request over its expanded context (one
        graph break for both); a mixed step's decodes still take the decode kernel."""
        write_kv(self.kv_cache, meta.slot_mapping, entries)
        decode = None
        if self.decode_backend != "reference":
            decode = lambda rows, m: self._decode_absorbed(q_nope[rows], q_pe[rows], m)  # noqa: E731
        q = torch.cat([q_nope, q_pe], dim=-1)
        return paged_attention_reference(q, self.kv_cache, meta, self._expand_kv, self.scale, self.cfg.v_head_dim,
                                         decode)  # fmt: skip

    def _decode_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Decode in the latent space (kv_b_proj absorbed into the query and the output): attention reads the
        cached latents directly, never expanding them per head. One token per request; padding tokens get 0."""
        cfg, heads, r = self.cfg, self.cfg.num_attention_heads, meta.num_reqs
        w = self.kv_b_proj.weight.view(heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        w_uk, w_uv = w.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)  # [heads, nope | v, kv_lora_rank]
        q_latent = torch.einsum("thd,hdl->thl", q_nope[:r], w_uk)  # [reqs, heads, kv_lora_rank]
        if self.decode_backend == "triton":
            from twinbatch.layers import triton_decode  # Triton is optional: imported only on this backend

            out_latent = triton_decode.mla_decode(q_latent, q_pe[:r], self.kv_cache, meta, self.scale)
        else:
            out_latent = self._latent_attention_batched(q_latent, q_pe[:r], meta)
        out = q_nope.new_zeros(q_nope.shape[0], heads, cfg.v_head_dim)
        out[:r] = torch.einsum("thl,hvl->thv", out_latent, w_uv)
        return out

    def _latent_attention_batched(
        self, q_latent: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q_latent [reqs, heads, kv_lora_rank], q_pe [reqs, heads, rope] over every request's padded cache
        -> out_latent [reqs, heads, kv_lora_rank]."""
        cfg = self.cfg
        entries, valid = gather_batched(self.kv_cache, meta)  # [reqs, S, kv_lora_rank + rope]
        latent, k_pe = entries.to(q_latent.dtype).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        scores = torch.einsum("thl,tsl->ths", q_latent, latent) + torch.einsum("thr,tsr->ths", q_pe, k_pe)
        probs = (scores.float() * self.scale).masked_fill(~valid[:, None, :], float("-inf")).softmax(-1)
        return torch.einsum("ths,tsl->thl", probs.to(latent.dtype), latent)

    def _expand_kv(self, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """entries [seq_len, kv_lora_rank + rope] -> k [seq_len, heads, nope + rope], v [seq_len, heads, v]."""
        cfg = self.cfg
        latent, k_pe = entries.to(self.kv_b_proj.weight.dtype).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], -1)
        kv = self.kv_b_proj(latent).view(-1, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, cfg.num_attention_heads, -1)], dim=-1)
        return k, v
