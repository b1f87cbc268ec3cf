"""The architecture of a checkpoint, read from a Hugging Face config.json into one typed, frozen record.

Both older and newer transformers keys are accepted: rope_theta + rope_scaling or rope_parameters,
torch_dtype or dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Qwen3MoeForCausalLM")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # "default" or "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    interleaved: bool = False  # DeepSeek rotates (x0, x1), (x2, x3) ...; Qwen rotates (x_i, x_{i+d/2})

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "yarn"):
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: default, yarn")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int  # GQA head dim (Qwen3); for MLA the query/key head dim is qk_nope + qk_rope
    intermediate_size: int  # dense MLP layers
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig
    eos_token_ids: tuple[int, ...]
    dtype: str | None  # the checkpoint's dtype, e.g. "bfloat16"
    # MoE
    moe_layers: tuple[bool, ...]
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int  # 0: no shared expert
    scoring_func: str  # "softmax" or "sigmoid"
    topk_method: str  # "greedy", "group_limited_greedy" or "noaux_tc"
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    # MLA (DeepSeek); kv_lora_rank == 0 means plain GQA attention
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def use_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def __post_init__(self) -> None:
        if self.topk_method != "greedy" and self.num_experts % self.n_group:
            raise ValueError(f"n_routed_experts ({self.num_experts}) must divide into n_group ({self.n_group})")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) > experts ({self.num_experts})")

    @staticmethod
    def read_config_json(model_dir: str | Path) -> dict[str, Any]:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint directory")
        return json.loads(path.read_text())

    @staticmethod
    def from_pretrained(model_dir: str | Path) -> ModelConfig:
        return ModelConfig.from_dict(ModelConfig.read_config_json(model_dir))

    @staticmethod
    def from_dict(cfg: dict[str, Any]) -> ModelConfig:
        arch = (cfg.get("architectures") or ["<none>"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        parse = _parse_qwen3_moe if arch == "Qwen3MoeForCausalLM" else _parse_deepseek
        try:
            return ModelConfig(**_parse_common(cfg, arch), **parse(cfg, arch))
        except KeyError as e:
            raise ValueError(f"config.json of this {arch} checkpoint lacks the key {e}") from None


def _parse_rope(cfg: dict[str, Any], interleaved: bool) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    return RopeConfig(
        theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        factor=float(params.get("factor") or 1.0),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))
        ),
        mscale=float(params.get("mscale") or 1.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        interleaved=interleaved,
    )


def _parse_common(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    heads = cfg["num_attention_heads"]
    return dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        intermediate_size=cfg["intermediate_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        eos_token_ids=eos_ids,
        dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        num_experts_per_tok=cfg["num_experts_per_tok"],
        moe_intermediate_size=cfg["moe_intermediate_size"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )


def _parse_deepseek(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    v3 = arch == "DeepseekV3ForCausalLM"
    num_layers, dense = cfg["num_hidden_layers"], cfg.get("first_k_dense_replace", 0)
    freq = cfg.get("moe_layer_freq", 1)
    topk_method = "noaux_tc" if v3 else cfg.get("topk_method") or "greedy"
    return dict(
        head_dim=cfg["qk_rope_head_dim"],
        rope=_parse_rope(cfg, interleaved=cfg.get("rope_interleave", True) if v3 else True),
        moe_layers=tuple(i >= dense and i % freq == 0 for i in range(num_layers)),
        num_experts=cfg["n_routed_experts"],
        shared_expert_intermediate_size=cfg["moe_intermediate_size"] * (cfg.get("n_shared_experts") or 0),
        scoring_func="sigmoid" if v3 else "softmax",
        topk_method=topk_method,
        n_group=cfg.get("n_group") or 1,
        topk_group=cfg.get("topk_group") or 1,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        kv_lora_rank=cfg["kv_lora_rank"],
        q_lora_rank=cfg.get("q_lora_rank"),
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
    )


def _parse_qwen3_moe(cfg: dict[str, Any], arch: str) -> dict[str, Any]:
    num_layers, step = cfg["num_hidden_layers"], cfg.get("decoder_sparse_step", 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    heads = cfg["num_attention_heads"]
    return dict(
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope=_parse_rope(cfg, interleaved=False),
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
        shared_expert_intermediate_size=0,
        scoring_func="softmax",
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
    )
