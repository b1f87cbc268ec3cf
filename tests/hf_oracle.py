"""Tiny random Hugging Face MoE checkpoints plus transformers reference outputs (the test oracle)."""

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
)

# ~1/sqrt(hidden_size): with the 0.02 default the layers barely perturb the residual stream, so the logits
# hardly depend on attention or experts and engine bugs there would go unnoticed.
INIT_STD = 0.125
# Router logits std ~2: smaller leaves top-k near ties, much larger (e.g. x100) saturates softmax/sigmoid so
# the k-th and (k+1)-th scores both round to 0 (or 1) and tie again.
ROUTER_SCALE = 2.0

COMMON: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=3, max_position_embeddings=512,
    bos_token_id=0, eos_token_id=1, pad_token_id=None, initializer_range=INIT_STD,
)  # fmt: skip
DEEPSEEK: dict[str, Any] = dict(
    **COMMON, first_k_dense_replace=1, intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, moe_intermediate_size=32, n_group=4, topk_group=2, num_attention_heads=4,
    num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
)  # fmt: skip
YARN: dict[str, Any] = dict(
    rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
    mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1,
)  # fmt: skip

_MODELS: dict[Path, PreTrainedModel] = {}


def _build(config: PreTrainedConfig, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.mul_(ROUTER_SCALE)
            elif name.endswith("norm.weight"):  # all-ones norms would hide norm-weight loading bugs
                param.add_(0.1 * torch.randn_like(param))
    return model


def make_deepseek_v2(path: Path, *, sharded: bool = False) -> Path:
    config = DeepseekV2Config(
        **DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5, q_lora_rank=None,
        rope_parameters=dict(YARN),
    )  # fmt: skip
    _build(config, seed=2).save_pretrained(path, max_shard_size="200KB" if sharded else "50GB")
    return path


def make_deepseek_v3(path: Path) -> Path:
    config = DeepseekV3Config(
        **DEEPSEEK, norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=48, rope_interleave=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    model = _build(config, seed=3)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("mlp.gate.e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    model.save_pretrained(path)
    return path


def make_qwen3_moe(path: Path, *, tie_word_embeddings: bool = False) -> Path:
    config = Qwen3MoeConfig(
        **COMMON, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, moe_intermediate_size=32,
        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        decoder_sparse_step=1, mlp_only_layers=[0], tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip
    _build(config, seed=4).save_pretrained(path)
    return path


def load_hf(model_dir: Path) -> PreTrainedModel:
    key = Path(model_dir).resolve()
    if key not in _MODELS:
        model = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32, attn_implementation="eager")
        _MODELS[key] = model.eval()
    return _MODELS[key]


@torch.no_grad()
def hf_logits(model_dir: Path, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] float32 logits of one full forward without a KV cache."""
    return load_hf(model_dir)(torch.tensor([token_ids]), use_cache=False).logits[0].float()


@torch.no_grad()
def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decode that never stops at eos; returns new tokens only. A full forward per token (no HF cache),
    so it works across transformers versions that renamed the cache argument."""
    model, ids = load_hf(model_dir), list(prompt_ids)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]
