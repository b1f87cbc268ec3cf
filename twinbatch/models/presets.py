"""Model configurations that need no download: they run with seeded random ("dummy") weights.

Named like the Hugging Face repositories whose shapes they copy, so a benchmark can say
`--model deepseek-ai/DeepSeek-V2-Lite --load-format dummy` on a machine with no hub access.
"""

from typing import Any

BUILTIN_MODEL = "twinbatch/tiny-deepseek-v2"

_DEEPSEEK_V2_LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "topk_method": "greedy",
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}

# The built-in default: DeepSeek-V2 architecture (MLA, a dense first layer, shared + routed experts), sized to
# load and generate in seconds on a laptop CPU. Its vocabulary is the bundled DeepSeek tokenizer's.
_TINY_DEEPSEEK_V2: dict[str, Any] = {
    **_DEEPSEEK_V2_LITE,
    "vocab_size": 129280,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "torch_dtype": None,
}

PRESETS: dict[str, dict[str, Any]] = {
    BUILTIN_MODEL: _TINY_DEEPSEEK_V2,
    "deepseek-ai/DeepSeek-V2-Lite": _DEEPSEEK_V2_LITE,
}
