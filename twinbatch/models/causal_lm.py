"""The decoder stack shared by every supported architecture; only the attention class differs.

Module names follow Hugging Face (model.layers.N.self_attn / mlp, lm_head), so checkpoints load by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from twinbatch.compilation import compile_layer
from twinbatch.config.model import ModelConfig
from twinbatch.layers.forward_context import ForwardContext
from twinbatch.layers.mlp import MLP
from twinbatch.layers.moe import ExpertPlacement, MoE
from twinbatch.layers.norm import RMSNorm
from twinbatch.layers.rotary import RotaryEmbedding
from twinbatch.models.deepseek_v2 import DeepseekV2Attention
from twinbatch.models.qwen3_moe import Qwen3MoeAttention

ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "DeepseekV2ForCausalLM": DeepseekV2Attention,
    "DeepseekV3ForCausalLM": DeepseekV2Attention,
    "Qwen3MoeForCausalLM": Qwen3MoeAttention,
}


@dataclass(frozen=True)
class ModelOptions:
    """What the layers take besides the checkpoint's config. The defaults are the reference kernels (the tests'
    oracle), every expert local, no KV cache and no torch.compile."""

    max_positions: int
    placement: ExpertPlacement = field(default_factory=ExpertPlacement)
    attention_backend: str = "reference"  # config.ATTENTION_BACKENDS
    moe_backend: str = "reference"  # config.MOE_BACKENDS
    kv_cache_blocks: tuple[int, int] = (0, 0)  # (blocks, tokens a block) of every attention layer's cache
    compile: bool = False  # DecoderLayer.forward under torch.compile (twinbatch/compilation.py)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, options: ModelOptions) -> None:
        super().__init__()
        attention = ATTENTION_CLASSES[cfg.architecture]
        self.self_attn = attention(cfg, rotary, backend=options.attention_backend, cache_blocks=options.kv_cache_blocks)
        self.is_moe = cfg.moe_layers[layer_idx]
        self.mlp = (MoE(cfg, options.placement, options.moe_backend, layer_idx) if self.is_moe
                    else MLP(cfg.hidden_size, cfg.intermediate_size))  # fmt: skip
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, ctx.attn)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, ctx) if self.is_moe else self.mlp(x))


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig, options: ModelOptions) -> None:
        super().__init__()
        rope_dim = cfg.qk_rope_head_dim if cfg.use_mla else cfg.head_dim
        rotary = RotaryEmbedding(cfg.rope, rope_dim, options.max_positions)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, rotary, options) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        compiled = compile_layer(DecoderLayer.forward) if options.compile else None
        self.compiled_layer: Callable[..., torch.Tensor] | None = compiled

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        compiled = self.compiled_layer
        for layer in self.layers:
            h = layer(h, positions, ctx) if compiled is None else compiled(layer, h, positions, ctx)
        return self.norm(h)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, options: ModelOptions) -> None:
        super().__init__()
        self.config = cfg
        self.model = Model(cfg, options)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Returns final hidden states [num_tokens, hidden]; logits are computed only where needed."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [num_rows, vocab]

    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers]

    def cache_entry_shape(self) -> tuple[int, ...]:
        return ATTENTION_CLASSES[self.config.architecture].cache_entry_shape(self.config)
