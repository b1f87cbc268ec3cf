"""Checks that the tiny HF checkpoints and the transformers reference in hf_oracle are fit to test against."""

import json
from pathlib import Path

import pytest
import torch
from hf_oracle import YARN, hf_greedy, hf_logits, load_hf, make_deepseek_v2, make_deepseek_v3, make_qwen3_moe
from safetensors.torch import load_file

IDS = torch.randint(2, 256, (64,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_oracle")
    return {
        "v2": make_deepseek_v2(root / "v2"),
        "v2_sharded": make_deepseek_v2(root / "v2_sharded", sharded=True),
        "v3": make_deepseek_v3(root / "v3"),
        "qwen3": make_qwen3_moe(root / "qwen3"),
        "qwen3_tied": make_qwen3_moe(root / "qwen3_tied", tie_word_embeddings=True),
    }


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_saved_files(dirs: dict[str, Path]) -> None:
    for name in ("v2", "v3", "qwen3", "qwen3_tied"):
        assert (dirs[name] / "config.json").is_file() and (dirs[name] / "model.safetensors").is_file()
    sharded = dirs["v2_sharded"]
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1


def test_config_json(dirs: dict[str, Path]) -> None:
    v2 = json.loads((dirs["v2"] / "config.json").read_text())
    assert v2["rope_parameters"] == YARN and "rope_scaling" not in v2 and "rope_theta" not in v2
    assert v2["topk_method"] == "group_limited_greedy" and v2["q_lora_rank"] is None
    qwen = json.loads((dirs["qwen3"] / "config.json").read_text())
    assert qwen["rope_parameters"]["rope_theta"] == 1e6 and qwen["mlp_only_layers"] == [0]
    assert json.loads((dirs["qwen3_tied"] / "config.json").read_text())["tie_word_embeddings"]


def test_deterministic(dirs: dict[str, Path], tmp_path: Path) -> None:
    first, again = _weights(dirs["qwen3"]), _weights(make_qwen3_moe(tmp_path / "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_weight_keys(dirs: dict[str, Path]) -> None:
    v3 = _weights(dirs["v3"])
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in v3
    assert "model.layers.1.self_attn.q_a_proj.weight" in v3
    assert v3["model.layers.2.mlp.gate.e_score_correction_bias"].abs().min() > 0
    assert "model.layers.0.mlp.gate_proj.weight" in _weights(dirs["qwen3"])
    assert "lm_head.weight" not in _weights(dirs["qwen3_tied"])


@pytest.mark.parametrize("name", ["v2", "v3", "qwen3", "qwen3_tied"])
def test_logits_and_greedy(dirs: dict[str, Path], name: str) -> None:
    logits = hf_logits(dirs[name], IDS)
    assert logits.shape == (len(IDS), 256) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and logits.std() > 0.1
    new = hf_greedy(dirs[name], IDS[:8], 12)
    assert len(new) == 12
    # the cached greedy decode must agree with uncached full forwards (teacher forcing)
    assert hf_logits(dirs[name], IDS[:8] + new)[7:-1].argmax(-1).tolist() == new


def test_sharded_matches_unsharded(dirs: dict[str, Path]) -> None:
    torch.testing.assert_close(hf_logits(dirs["v2_sharded"], IDS), hf_logits(dirs["v2"], IDS), rtol=0, atol=0)


def _router_scores(model_dir: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(scores used for the top-k choice, same without the correction bias) for every MoE layer and token."""
    model, inputs = load_hf(model_dir), []
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    hooks = [g.register_forward_hook(lambda m, a, o: inputs.append((m, a[0]))) for g in gates]
    hf_logits(model_dir, IDS)
    for h in hooks:
        h.remove()
    out = []
    for gate, x in inputs:
        logits = x.reshape(-1, x.shape[-1]).float() @ gate.weight.float().T
        bias = getattr(gate, "e_score_correction_bias", None)
        raw = logits.softmax(-1) if bias is None else logits.sigmoid()
        out.append((raw if bias is None else raw + bias, raw))
    return out


@pytest.mark.parametrize("name", ["v2", "v3", "qwen3"])
def test_router_separation(dirs: dict[str, Path], name: str) -> None:
    scores = torch.cat([s for s, _ in _router_scores(dirs[name])])
    top = scores.topk(3, dim=-1).values
    gap = top[:, 1] - top[:, 2]  # k=2: 2nd vs 3rd best expert
    assert gap.median() > 1e-2 and (gap > 1e-3).float().mean() > 0.95


def test_v3_bias_changes_choices(dirs: dict[str, Path]) -> None:
    for with_bias, raw in _router_scores(dirs["v3"]):
        changed = (with_bias.topk(2).indices.sort().values != raw.topk(2).indices.sort().values).any(-1)
        assert changed.any()
