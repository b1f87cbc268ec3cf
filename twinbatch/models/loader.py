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

from twinbatch.config.model import ModelConfig
from twinbatch.layers.moe import Experts
from twinbatch.models.causal_lm import CausalLM, ModelOptions

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
    options: ModelOptions,
    dtype: torch.dtype,
    device: torch.device,
    model_dir: str | None,
    load_format: str,
    seed: int,
) -> CausalLM:
    """The model on `device` in `dtype` (its KV cache too), with the checkpoint's weights or dummy ones."""
    with _default_dtype(dtype), torch.device(device):
        model = CausalLM(cfg, options)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        assert model_dir is not None
        load_safetensors(model, Path(model_dir))
    return model.eval().requires_grad_(False)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Seeded N(0, 1/fan_in) weights, norms at 1. Each tensor (each expert) has its own seed derived from its
    name and global expert id, so the values do not depend on which other tensors a process holds."""
    offsets = {f"{pre}.{p}": m.expert_offset for pre, m in _experts(model).items() for p, _ in m.named_parameters()}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        std = 1.0 if "embed_tokens" in name else param.shape[-1] ** -0.5
        rows = param.data.unbind(0) if name in offsets else [param.data]  # experts: one seed each
        for j, row in enumerate(rows, start=offsets.get(name, 0)):
            gen = torch.Generator(param.device).manual_seed(seed * 1_000_003 + zlib.crc32(f"{name}.{j}".encode()))
            row.normal_(0.0, std, generator=gen)


def _experts(model: nn.Module) -> dict[str, Experts]:
    return {prefix: m for prefix, m in model.named_modules() if isinstance(m, Experts)}


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}; twinbatch loads safetensors checkpoints")
    return files


def _copy(key: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(
            f"weight {key}: checkpoint shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}; "
            "does config.json belong to this checkpoint?"
        )
    dst.copy_(src)


class _Loader:
    """Copies checkpoint tensors into a model and keeps account of what arrived."""

    _PARTS = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, model: CausalLM) -> None:
        self.targets = {n: p.data for n, p in model.named_parameters()}
        self.targets |= {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
        self.experts = _experts(model)
        self.num_experts = model.config.num_experts
        self.loaded: set[str] = set()

    def expected(self) -> set[str]:
        """Checkpoint names that must be present, with this process's experts listed one tensor each."""
        keys = set(self.targets)
        for prefix, m in self.experts.items():
            keys -= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
            ids = range(m.expert_offset, m.expert_offset + m.num_experts)
            keys |= {f"{prefix}.{j}.{p}.weight" for j in ids for p in self._PARTS}
        return keys

    def wants(self, key: str) -> bool:
        match = _EXPERT_KEY.match(key)
        if match is None:
            return key in self.targets
        m = self.experts.get(match.group(1))
        return m is not None and 0 <= int(match.group(2)) - m.expert_offset < m.num_experts

    def is_foreign_expert(self, key: str) -> bool:
        """Another EP rank's expert: known, but not loaded here."""
        match = _EXPERT_KEY.match(key)
        return match is not None and match.group(1) in self.experts and not self.wants(key)

    def load(self, key: str, tensor: torch.Tensor) -> None:
        match = _EXPERT_KEY.match(key)
        if match:
            prefix, part = match.group(1), match.group(3)
            j = int(match.group(2)) - self.experts[prefix].expert_offset
            if part == "down_proj":
                dst = self.targets[f"{prefix}.down_proj"][j]
            else:
                dst = self.targets[f"{prefix}.gate_up_proj"][j].chunk(2, dim=0)[0 if part == "gate_proj" else 1]
            _copy(key, dst, tensor)
        elif key.rsplit(".", 1)[0] in self.experts:  # a packed [num_experts, ...] tensor
            self._load_packed(key, tensor)
        else:
            _copy(key, self.targets[key], tensor)
        self.loaded.add(key)

    def _load_packed(self, key: str, tensor: torch.Tensor) -> None:
        prefix, name = key.rsplit(".", 1)
        m = self.experts[prefix]
        ids = range(m.expert_offset, m.expert_offset + m.num_experts)
        if tensor.shape[0] != self.num_experts:
            raise ValueError(f"weight {key}: {tensor.shape[0]} experts in the checkpoint, {self.num_experts} in config")
        _copy(key, self.targets[key], tensor[ids.start : ids.stop])
        parts = ("gate_proj", "up_proj") if name == "gate_up_proj" else ("down_proj",)
        self.loaded |= {f"{prefix}.{j}.{p}.weight" for j in ids for p in parts}


def load_safetensors(model: CausalLM, model_dir: Path) -> None:
    loader = _Loader(model)
    num_layers = model.config.num_hidden_layers
    unexpected: list[str] = []
    for path in _checkpoint_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                layer = re.match(r"model\.layers\.(\d+)\.", key)
                if _IGNORED.search(key) or (layer and int(layer.group(1)) >= num_layers):
                    continue  # e.g. DeepSeek-V3's multi-token-prediction layer
                if (key == "lm_head.weight" and model.config.tie_word_embeddings) or loader.is_foreign_expert(key):
                    continue
                if loader.wants(key):
                    loader.load(key, f.get_tensor(key))
                else:
                    unexpected.append(key)
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model has no place for: %s", len(unexpected), unexpected[:5])
    missing = sorted(loader.expected() - loader.loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"checkpoint {model_dir} is missing weights: {', '.join(missing[:5])}{more}")
