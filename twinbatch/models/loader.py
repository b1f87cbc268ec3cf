"""Builds a model and fills its weights: from Hugging Face safetensors, or seeded random ("dummy") values.

Checkpoint names map one-to-one onto module names, except that per-expert tensors
(`...mlp.experts.{j}.gate_proj.weight`, `up_proj`, `down_proj`) are packed into the experts' 3-D tensors.
Packed checkpoints (`...mlp.experts.gate_up_proj`) load as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from twinbatch.layers.moe import Experts
from twinbatch.models.causal_lm import CausalLM
from twinbatch.models.hf_config import ModelConfig

logger = logging.getLogger(__name__)

_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    cfg: ModelConfig,
    max_positions: int,
    dtype: torch.dtype,
    device: torch.device,
    model_dir: str | None,
    load_format: str,
    seed: int,
) -> CausalLM:
    with _default_dtype(dtype), torch.device(device):
        model = CausalLM(cfg, max_positions)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        assert model_dir is not None
        load_safetensors(model, Path(model_dir))
    return model.eval().requires_grad_(False)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Seeded N(0, 1/fan_in) weights, norms at 1. Each tensor (each expert) has its own seed derived from its
    name, so the values do not depend on which other tensors a process holds."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        std = 1.0 if "embed_tokens" in name else param.shape[-1] ** -0.5
        rows = param.data.unbind(0) if param.dim() == 3 else [param.data]  # 3-D: one seed per expert
        for j, row in enumerate(rows):
            gen = torch.Generator(param.device).manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}.{j}".encode()))
            row.normal_(0.0, std, generator=gen)


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}; twinbatch loads safetensors checkpoints")
    return files


def _expected_keys(model: nn.Module, targets: dict[str, torch.Tensor]) -> set[str]:
    """Checkpoint names that must be present, with packed experts listed one tensor per expert."""
    keys = set(targets)
    for prefix, module in model.named_modules():
        if isinstance(module, Experts):
            keys -= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
            parts = ("gate_proj", "up_proj", "down_proj")
            keys |= {f"{prefix}.{j}.{p}.weight" for j in range(module.num_experts) for p in parts}
    return keys


def _copy(key: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"weight {key}: checkpoint shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}; "
            "does config.json belong to this checkpoint?"
        )
    dst.copy_(src)


def _load_one(key: str, tensor: torch.Tensor, targets: dict[str, torch.Tensor], loaded: set[str]) -> bool:
    """Copies one checkpoint tensor into place; returns False if the model has no place for it."""
    match = _EXPERT_KEY.match(key)
    if match:
        prefix, j, part = match.group(1), int(match.group(2)), match.group(3)
        if part == "down_proj":
            dst = targets[f"{prefix}.down_proj"][j]
        else:
            gate_up = targets[f"{prefix}.gate_up_proj"][j]
            dst = gate_up.chunk(2, dim=0)[0 if part == "gate_proj" else 1]
        _copy(key, dst, tensor)
    elif key in targets:
        _copy(key, targets[key], tensor)
        if key.endswith("experts.gate_up_proj") or key.endswith("experts.down_proj"):
            part = ("gate_proj", "up_proj") if key.endswith("gate_up_proj") else ("down_proj",)
            prefix = key.rsplit(".", 1)[0]
            loaded |= {f"{prefix}.{j}.{p}.weight" for j in range(tensor.shape[0]) for p in part}
    else:
        return False
    loaded.add(key)
    return True


def load_safetensors(model: CausalLM, model_dir: Path) -> None:
    targets = {n: p.data for n, p in model.named_parameters()}
    targets |= {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    num_layers = model.config.num_hidden_layers
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in _checkpoint_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                layer = re.match(r"model\.layers\.(\d+)\.", key)
                if _IGNORED.search(key) or (layer and int(layer.group(1)) >= num_layers):
                    continue  # e.g. DeepSeek-V3's multi-token-prediction layer
                if key == "lm_head.weight" and model.config.tie_word_embeddings:
                    continue
                if not _load_one(key, f.get_tensor(key), targets, loaded):
                    unexpected.append(key)
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model has no place for: %s", len(unexpected), unexpected[:5])
    missing = sorted(_expected_keys(model, targets) - loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {model_dir} is missing weights: {', '.join(missing[:5])}{more}")
