"""Checkpoint loading against oracles: HF logits for older config keys, the per-expert checkpoint for packed
experts, the checkpoint tensors for dtype handling, seeded rebuilds for dummy weights, HF's parameter count for
the DeepSeek-V2-Lite preset, and the bundled tokenizer for the built-in model.
"""

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HF_PROMPTS, assert_matches_hf, make_llm, run_recording
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from twinbatch import LLM, SamplingParams
from twinbatch.config.model import ModelConfig
from twinbatch.models.causal_lm import CausalLM, ModelOptions
from twinbatch.models.loader import build_model
from twinbatch.models.presets import BUILTIN_MODEL, PRESETS
from twinbatch.tokenizer import builtin_tokenizer_dir

_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FLOAT32_KEYS = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
V2_LITE = "deepseek-ai/DeepSeek-V2-Lite"


def copy_checkpoint(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def pack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors -> experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and experts.down_proj
    [E, H, I]; other tensors unchanged."""
    parts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    packed = {}
    for key, tensor in tensors.items():
        match = _EXPERT_KEY.match(key)
        if match is None:
            packed[key] = tensor
            continue
        prefix, j, part = match.group(1), int(match.group(2)), match.group(3)
        parts.setdefault(prefix, {}).setdefault(part, {})[j] = tensor
    for prefix, by_part in parts.items():
        experts = range(len(by_part["down_proj"]))
        packed[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([by_part["gate_proj"][j], by_part["up_proj"][j]]) for j in experts]
        )
        packed[f"{prefix}.down_proj"] = torch.stack([by_part["down_proj"][j] for j in experts])
    return packed


def old_style_config(cfg: dict[str, Any]) -> None:
    """Rewrites a transformers-5 config.json in the keys older transformers wrote."""
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype")
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")


def engine_state(llm: LLM) -> dict[str, torch.Tensor]:
    return llm.llm_engine.model_runner.model.state_dict()


@pytest.mark.parametrize("fixture", ["dsv2_dir", "dsv3_dir", "qwen3_dir"])
def test_old_style_config_keys_match_hf(request: pytest.FixtureRequest, tmp_path: Path, fixture: str) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    old_dir = copy_checkpoint(model_dir, tmp_path / "old", old_style_config)
    old = json.loads((old_dir / "config.json").read_text())
    assert "rope_parameters" not in old and "dtype" not in old and "rope_theta" in old
    assert ModelConfig.from_pretrained(old_dir) == ModelConfig.from_pretrained(model_dir)
    assert_matches_hf(model_dir, make_llm(old_dir), HF_PROMPTS)


@pytest.mark.parametrize("fixture", ["dsv2_dir", "dsv3_dir", "qwen3_dir"])
def test_packed_experts_load_like_per_expert(request: pytest.FixtureRequest, tmp_path: Path, fixture: str) -> None:
    model_dir: Path = request.getfixturevalue(fixture)
    packed_dir = copy_checkpoint(model_dir, tmp_path / "packed")
    packed = pack_experts(load_file(model_dir / "model.safetensors"))
    assert any(k.endswith("experts.gate_up_proj") for k in packed)
    assert not any(_EXPERT_KEY.match(k) for k in packed)
    save_file(packed, packed_dir / "model.safetensors")
    ref_tokens, ref_logits, _ = run_recording(make_llm(model_dir), HF_PROMPTS)
    tokens, logits, _ = run_recording(make_llm(packed_dir), HF_PROMPTS)
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits, strict=True):
        assert torch.equal(ours, ref)


def test_dummy_weights_need_no_checkpoint_and_follow_the_seed(dsv2_dir: Path, tmp_path: Path) -> None:
    bare = copy_checkpoint(dsv2_dir, tmp_path / "bare")
    (bare / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="twinbatch loads safetensors checkpoints"):
        make_llm(bare)
    llms = [make_llm(bare, load_format="dummy", seed=seed) for seed in (7, 7, 8)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens = [[o.outputs[0].token_ids for o in llm.generate(HF_PROMPTS, params, use_tqdm=False)] for llm in llms]
    assert tokens[0] == tokens[1]
    assert all(len(t) == params.max_tokens for t in tokens[0])
    base, same, changed = (engine_state(llm) for llm in llms)
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not any(torch.equal(base[k], changed[k]) for k in base if not k.endswith("norm.weight"))


def test_dummy_values_do_not_depend_on_other_tensors(dsv2_dir: Path) -> None:
    cfg = ModelConfig.from_pretrained(dsv2_dir)
    part_cfg = replace(cfg, num_hidden_layers=2, moe_layers=cfg.moe_layers[:2], num_experts=4)
    full, part = (
        build_model(c, ModelOptions(16), torch.float32, torch.device("cpu"), None, "dummy", seed=3).state_dict()
        for c in (cfg, part_cfg)
    )
    for name, tensor in part.items():
        if name.endswith("mlp.gate.weight"):
            continue  # its row count is the expert count: a different tensor, so a different seed
        ref = full[name][: tensor.shape[0]] if tensor.dim() == 3 else full[name]
        assert torch.equal(tensor, ref), name


V2_LITE_SHAPES: dict[str, Any] = dict(
    hidden_size=2048, num_hidden_layers=27, moe_layers=(False,) + (True,) * 26, num_experts=64,
    shared_expert_intermediate_size=2 * 1408, num_experts_per_tok=6, moe_intermediate_size=1408,
    intermediate_size=10944, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, num_attention_heads=16, vocab_size=102400, topk_method="greedy", scoring_func="softmax",
)  # fmt: skip


def test_v2_lite_preset_config() -> None:
    cfg = ModelConfig.from_dict(PRESETS[V2_LITE])
    assert {k: getattr(cfg, k) for k in V2_LITE_SHAPES} == V2_LITE_SHAPES
    assert (cfg.rope.rope_type, cfg.rope.factor, cfg.rope.original_max_position_embeddings) == ("yarn", 40.0, 4096)


def test_v2_lite_preset_has_15_7b_parameters() -> None:
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    with torch.device("meta"):
        ours = CausalLM(ModelConfig.from_dict(PRESETS[V2_LITE]), ModelOptions(16))
        hf = AutoModelForCausalLM.from_config(DeepseekV2Config(**PRESETS[V2_LITE]))
    count = sum(p.numel() for p in ours.parameters())
    assert abs(count - 15.7e9) < 0.02 * 15.7e9
    assert count == sum(p.numel() for p in hf.parameters())


def _set_config_dtype(key: str | None) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        if key is not None:
            del cfg["dtype"]
            cfg[key] = "bfloat16"

    return edit


@pytest.mark.parametrize(
    ("fixture", "config_key", "dtype", "expected"),
    [
        ("dsv3_dir", None, "auto", torch.float32),
        ("qwen3_dir", None, "auto", torch.float32),
        ("dsv3_dir", None, "bfloat16", torch.bfloat16),
        ("qwen3_dir", None, "bfloat16", torch.bfloat16),
        ("dsv2_dir", "dtype", "auto", torch.bfloat16),
        ("dsv2_dir", "torch_dtype", "auto", torch.bfloat16),
        ("dsv2_dir", "torch_dtype", "float32", torch.float32),
    ],
)
def test_dtype_of_weights_and_kv_cache(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    fixture: str,
    config_key: str | None,
    dtype: str,
    expected: torch.dtype,
) -> None:
    model_dir = copy_checkpoint(request.getfixturevalue(fixture), tmp_path / "ckpt", _set_config_dtype(config_key))
    llm = LLM(str(model_dir), dtype=dtype, max_model_len=32)
    checkpoint = pack_experts(load_file(model_dir / "model.safetensors"))
    state = engine_state(llm)
    assert set(state) == set(checkpoint)
    for key, ref in checkpoint.items():
        want = torch.float32 if key.endswith(_FLOAT32_KEYS) else expected
        assert state[key].dtype == want, key
        assert torch.equal(state[key], ref.to(want)), key
    assert all(cache.dtype == expected for cache in llm.llm_engine.model_runner.kv_caches)


def test_builtin_model_generates_text(builtin_llm: LLM) -> None:
    tokenizer = builtin_llm.get_tokenizer()
    bundled = Tokenizer.from_file(str(builtin_tokenizer_dir() / "tokenizer.json"))
    prompt = "The capital of France is"
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    (out,) = builtin_llm.generate(prompt, params, use_tqdm=False)
    assert builtin_llm.llm_engine.config.model == ModelConfig.from_dict(PRESETS[BUILTIN_MODEL])
    assert builtin_llm.llm_engine.config.model.vocab_size == len(tokenizer) == bundled.get_vocab_size() == 129280
    assert out.prompt == prompt
    assert out.prompt_token_ids == tokenizer.encode(prompt) == bundled.encode(prompt).ids
    ids = out.outputs[0].token_ids
    assert len(ids) == params.max_tokens
    assert out.outputs[0].text == tokenizer.decode(ids, skip_special_tokens=True)
