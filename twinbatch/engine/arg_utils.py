"""EngineArgs: the user-facing options (vLLM's names), turned into a validated EngineConfig.

The CLI flags are generated from the fields, so an option exists once: `max_num_seqs` is `--max-num-seqs`, with
its --help text and choices in the field's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from twinbatch.compilation import parse_level
from twinbatch.config import (
    ATTENTION_BACKENDS,
    DTYPE_ALIASES,
    DTYPES,
    MOE_BACKENDS,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
    option,
    resolve_device,
    resolve_dtype,
)
from twinbatch.config.model import ModelConfig
from twinbatch.models.presets import BUILTIN_MODEL, PRESETS

_GIB = 1 << 30


def _auto(choice: str, gpu_choice: str, device: torch.device) -> str:
    """ "auto" picks the fast path on GPU and the reference path (the tests' oracle) on CPU."""
    return (gpu_choice if device.type == "cuda" else "reference") if choice == "auto" else choice


T = TypeVar("T")


def _default(value: T | None, default: T) -> T:
    return default if value is None else value


LOAD_FORMATS = ("auto", "safetensors", "dummy")


def _options_of(*configs: type) -> Callable[[type], type]:
    """Adds to a dataclass-to-be the fields of `configs` that users set (those made with config.option, the
    data_parallel_rank of each worker is not one), with their defaults, help texts and choices: an option exists
    once, in its config."""

    def add(cls: type) -> type:
        for config in configs:
            for f in dataclasses.fields(config):
                if "help" in f.metadata:
                    cls.__annotations__[f.name] = f.type
                    setattr(cls, f.name, field(default=f.default, metadata=f.metadata))
        return cls

    return add


@dataclass
@_options_of(SchedulerConfig, CacheConfig, ParallelConfig)
class EngineArgs:
    model: str | None = option(
        None,
        "checkpoint directory (config.json and *.safetensors) or built-in preset "
        f"({', '.join(PRESETS)}); none: the built-in model, a small DeepSeek-V2-architecture model with random "
        "weights",
    )
    hf_overrides: str | dict | None = option(  # noqa: RUF009 (a field, not a shared mutable default)
        None, "JSON object merged into the model's config.json, e.g. '{\"num_hidden_layers\": 4}'"
    )
    tokenizer: str | None = option(
        None, "tokenizer directory (default: the checkpoint's; for a preset, the bundled DeepSeek tokenizer)"
    )
    dtype: str = option(
        "auto",
        "weights and activations; auto: the checkpoint's dtype, else bfloat16 on GPU and float32 on CPU",
        ("auto", *DTYPES, *DTYPE_ALIASES),
    )
    max_model_len: int | None = option(
        None, "most tokens (prompt and output) of one request (default: the model's max_position_embeddings)"
    )
    max_num_batched_tokens: int | None = option(
        None, "most tokens in one step, per DP rank (default: 8192 on GPU, 2048 on CPU)"
    )
    async_scheduling: bool | None = option(
        None,
        "schedule and prepare each step while the device runs the one before, its tokens read a step later "
        "(default: on for CUDA; off on CPU, where the host runs the model itself, so nothing overlaps)",
    )
    num_gpu_blocks_override: int | None = option(None, "KV-cache blocks per rank, instead of sizing the cache")
    kv_cache_memory_bytes: int | None = option(
        None,
        "KV-cache bytes per rank (default: 2 GiB on CPU; on GPU what --gpu-memory-utilization leaves after the "
        "weights and a 2 GiB activation reserve)",
    )
    gpu_memory_utilization: float = option(0.9, "fraction of each GPU's memory the engine may use")
    load_format: str = option(
        "auto",
        "where the weights come from; auto: safetensors for a checkpoint, dummy for a preset; dummy: seeded "
        "random weights of the model's shapes",
        LOAD_FORMATS,
    )
    seed: int = option(0, "seed of the dummy weights and of sampling without a per-request seed")
    device: str = option("auto", "auto (cuda if a GPU is visible, else cpu), cpu, cuda or cuda:N")
    attention_backend: str = option(
        "auto",
        "attention kernels; auto: triton on GPU, reference on CPU; reference: a loop over requests (the tests' "
        "oracle); batched: vectorised decode; triton: a fused paged-KV decode kernel (CUDA)",
        ("auto", *ATTENTION_BACKENDS),
    )
    moe_backend: str = option(
        "auto",
        "routed-expert kernels; auto: triton on GPU, reference on CPU; reference: a loop over experts (the "
        "tests' oracle); grouped_mm: torch._grouped_mm; triton: fused grouped-GEMM kernels (CUDA)",
        ("auto", *MOE_BACKENDS),
    )
    enforce_eager: bool = option(False, "turn off CUDA graphs (every step launches its kernels one by one)")
    compilation_config: str | None = option(
        None,
        "torch.compile of the decoder layers: a level 0-3 (-O0 turns it off) or JSON such as '{\"level\": 0}' "
        "(default: 3 on GPU, 0 on CPU)",
    )
    enable_dbo: bool = option(False, "vLLM's name for --overlap dbo")
    enable_single_batch_overlap: bool = option(False, "SGLang's name for --overlap sbo")

    def _overlap(self) -> str:
        """--overlap, or the mode its alias flags name."""
        chosen = {mode for mode, flag in (("dbo", self.enable_dbo), ("sbo", self.enable_single_batch_overlap)) if flag}
        if self.overlap != "off":
            chosen.add(self.overlap)
        if len(chosen) > 1:
            raise ValueError(f"overlap modes {sorted(chosen)} were both asked for (--overlap, --enable-dbo, "
                             "--enable-single-batch-overlap); choose one")  # fmt: skip
        return chosen.pop() if chosen else "off"

    def _parallel_config(self) -> ParallelConfig:
        """Under torchrun each of its processes is one node of data_parallel_size // WORLD_SIZE ranks; its
        MASTER_PORT belongs to torchrun's own store, so twinbatch's ranks meet on the next port."""
        names = [f.name for f in dataclasses.fields(ParallelConfig) if "help" in f.metadata]
        fields = {name: getattr(self, name) for name in names} | {"overlap": self._overlap()}
        env = os.environ
        if "TORCHELASTIC_RUN_ID" in env and self.nnodes == 1 and self.data_parallel_size > 1:
            fields |= dict(
                nnodes=int(env["WORLD_SIZE"]), node_rank=int(env["RANK"]), master_addr=env["MASTER_ADDR"],
                master_port=int(env["MASTER_PORT"]) + 1,
            )  # fmt: skip
        return ParallelConfig(**fields)

    def _overrides(self) -> dict[str, Any]:
        overrides = self.hf_overrides or {}
        if isinstance(overrides, str):
            try:
                overrides = json.loads(overrides)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"hf_overrides must be a JSON object, e.g. '{{\"num_hidden_layers\": 4}}': {e}"
                ) from None
        return overrides

    def _resolve_model(self) -> tuple[str | None, ModelConfig, str, str | None]:
        """-> (checkpoint dir or None, model config, load format, tokenizer path or None for the built-in)."""
        name = self.model or BUILTIN_MODEL
        if Path(name).is_dir():
            load_format = "safetensors" if self.load_format == "auto" else self.load_format
            config = ModelConfig.read_config_json(name) | self._overrides()
            return name, ModelConfig.from_dict(config), load_format, self.tokenizer or name
        if name not in PRESETS:
            raise ValueError(
                f"model {name!r} is neither a local checkpoint directory nor a built-in preset "
                f"({', '.join(PRESETS)}); twinbatch does not download models"
            )
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"preset {name!r} has no weight files; use load_format='dummy'")
        return None, ModelConfig.from_dict(PRESETS[name] | self._overrides()), "dummy", self.tokenizer

    def _validate(self) -> None:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format={self.load_format!r}; choose auto, safetensors or dummy")
        for name in ("block_size", "max_num_seqs", "max_model_len", "max_num_batched_tokens",
                     "num_gpu_blocks_override", "kv_cache_memory_bytes"):  # fmt: skip
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    def create_engine_config(self) -> EngineConfig:
        self._validate()
        parallel = self._parallel_config()
        model_dir, model_cfg, load_format, tokenizer = self._resolve_model()
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, model_cfg.dtype, device)
        max_model_len = _default(self.max_model_len, model_cfg.max_position_embeddings)
        default_tokens = 8192 if device.type == "cuda" else 2048
        tokens = _default(self.max_num_batched_tokens, default_tokens)
        async_scheduling = _default(self.async_scheduling, device.type == "cuda")
        sched = SchedulerConfig(tokens, max_model_len, self.max_num_seqs, async_scheduling)
        num_blocks = self.num_gpu_blocks_override
        if num_blocks is None:
            num_blocks = self._default_num_blocks(model_cfg, sched, dtype, device, parallel.ep_size)
        return EngineConfig(
            model_path=model_dir,
            tokenizer_path=tokenizer,
            model=model_cfg,
            cache=CacheConfig(num_blocks, self.block_size),
            scheduler=sched,
            device=device,
            dtype=dtype,
            load_format=load_format,
            seed=self.seed,
            parallel=parallel,
            attention_backend=_auto(self.attention_backend, "triton", device),
            moe_backend=_auto(self.moe_backend, "triton", device),
            enforce_eager=self.enforce_eager,
            compilation_level=parse_level(self.compilation_config, 3 if device.type == "cuda" else 0),
        )

    def _default_num_blocks(
        self, cfg: ModelConfig, sched: SchedulerConfig, dtype: torch.dtype, device: torch.device, ep_size: int
    ) -> int:
        """Enough blocks for max_num_seqs full-length requests, capped by the KV-cache memory budget:
        kv_cache_memory_bytes if set; else 2 GiB on CPU, or on GPU the part of gpu_memory_utilization
        the weights and a 2 GiB activation reserve leave free."""
        from twinbatch.layers.moe import ExpertPlacement
        from twinbatch.models.causal_lm import CausalLM, ModelOptions

        with torch.device("meta"):
            meta = CausalLM(cfg, ModelOptions(1, ExpertPlacement(0, ep_size)))  # this rank's share of the experts
        entry = meta.cache_entry_shape()
        itemsize = torch.empty(0, dtype=dtype).element_size()
        block_bytes = self.block_size * cfg.num_hidden_layers * itemsize * int(torch.tensor(entry).prod())
        budget = self.kv_cache_memory_bytes
        if budget is None and device.type == "cuda":
            weights = sum(p.numel() for p in meta.parameters()) * itemsize
            total = torch.cuda.get_device_properties(device).total_memory
            budget = int(total * self.gpu_memory_utilization) - weights - 2 * _GIB
        budget = budget if budget is not None else 2 * _GIB
        wanted = sched.max_num_seqs * -(-sched.max_model_len // self.block_size) + 1
        return max(2, min(wanted, budget // block_bytes))

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        """A flag per field, with the field's help text and choices; a parser's set_defaults shows in the help."""
        for f in dataclasses.fields(EngineArgs):
            flag = "--" + f.name.replace("_", "-")
            flags = ("-O", flag) if f.name == "compilation_config" else (flag,)  # vLLM's -O0 .. -O3
            text = f.metadata["help"]
            if f.type == "bool":
                parser.add_argument(*flags, action="store_true", help=text)
                continue
            if f.type == "bool | None":  # on or off by default per device: --flag / --no-flag
                parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=text)
                continue
            typ = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
            text += "" if f.default is None else " (default: %(default)s)"
            parser.add_argument(*flags, type=typ, default=f.default, choices=f.metadata["choices"], help=text)

    @staticmethod
    def from_cli_args(args: argparse.Namespace) -> EngineArgs:
        return EngineArgs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs)})

    @staticmethod
    def from_kwargs(**kwargs: Any) -> EngineArgs:
        known = {f.name for f in dataclasses.fields(EngineArgs)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(known)}")
        return EngineArgs(**kwargs)
