"""Frozen, typed configuration. Invalid combinations fail here, at startup, with a message saying what to change."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from twinbatch.config.model import ModelConfig
from twinbatch.distributed.all2all import BACKENDS


def option(default: Any, text: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field that users set: its one default, its --help text and, where the set of values is closed,
    its choices. EngineArgs takes such fields over as options (engine/arg_utils.py)."""
    return field(default=default, metadata={"help": text, "choices": choices})


OVERLAP_MODES = ("off", "dbo", "sbo", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' keeps the checkpoint's dtype; without one, bfloat16 on GPU and float32 on CPU."""
    name = DTYPE_ALIASES.get(name, name)
    if name == "auto":
        name = checkpoint_dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is visible; use device='cpu'")
    return device


@dataclass(frozen=True)
class CacheConfig:
    num_blocks: int
    block_size: int = option(16, "tokens per KV-cache block")

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_blocks < 1:
            raise ValueError(f"block_size ({self.block_size}) and num KV blocks ({self.num_blocks}) must be >= 1")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int
    max_model_len: int
    max_num_seqs: int = option(256, "most requests running at once, per DP rank")
    async_scheduling: bool = False  # EngineArgs.async_scheduling

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ParallelConfig:
    """Data parallelism (one process per DP rank) and expert parallelism (experts split over all DP ranks).

    torchrun-style rendezvous: every process meets at master_addr:master_port; with nnodes > 1 each node
    starts data_parallel_size // nnodes ranks, node 0 also runs the front end.
    """

    data_parallel_size: int = option(1, "DP ranks, one process (and one GPU) each")
    enable_expert_parallel: bool = option(False, "split the routed experts over the DP ranks")
    all2all_backend: str = option(
        "allgather_reducescatter",
        "how expert-parallel ranks exchange tokens; allgather_reducescatter: every rank gathers every rank's tokens; "
        "all2all: fixed-capacity buffers (CUDA-graph safe); all2allv: variable sizes (less traffic, one host sync)",
        tuple(BACKENDS),
    )
    nnodes: int = option(1, "nodes the DP ranks span, each running --data-parallel-size / --nnodes of them")
    node_rank: int = option(0, "this node's index; node 0 runs the front end")
    master_addr: str = option("127.0.0.1", "address of node 0, where every rank meets")
    master_port: int = option(29500, "port on --master-addr where every rank meets")
    overlap: str = option(
        "off",
        "how a step hides the expert-parallel all-to-alls (needs --enable-expert-parallel and --data-parallel-size 2 "
        "or more); off: only the shared experts run beside the dispatch; dbo (--enable-dbo): dual-batch overlap, "
        "steps that reach a threshold split into microbatches, one communicating while another computes; sbo "
        "(--enable-single-batch-overlap): single-batch overlap, the local experts in --sbo-rounds groups, one "
        "group's tokens travelling while another group computes; auto: per step shape, time off, dbo and sbo on "
        "real steps and keep the fastest",
        OVERLAP_MODES,
    )
    sbo_rounds: int = option(2, "groups of local experts per SBO step (1: the shared experts' overlap alone)")
    ubatch_size: int = option(2, "microbatches per DBO step")
    dbo_decode_token_threshold: int = option(
        32, "a rank's batch of only decodes votes to microbatch from this many tokens"
    )
    dbo_prefill_token_threshold: int = option(512, "any other batch votes to microbatch from this many tokens")
    data_parallel_rank: int = 0  # this process's rank (set in each worker)

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1 or self.nnodes < 1:
            raise ValueError("data_parallel_size and nnodes must be >= 1")
        if self.data_parallel_size % self.nnodes:
            raise ValueError(
                f"data_parallel_size ({self.data_parallel_size}) must be a multiple of nnodes ({self.nnodes}): "
                "every node runs the same number of DP ranks"
            )
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.all2all_backend not in BACKENDS:
            raise ValueError(f"all2all_backend={self.all2all_backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.overlap not in OVERLAP_MODES:
            raise ValueError(f"overlap={self.overlap!r}; choose one of {', '.join(OVERLAP_MODES)}")
        if self.overlap != "off" and self.ep_size < 2:
            raise ValueError(
                f"overlap={self.overlap!r} overlaps the expert-parallel all-to-alls: it needs "
                "--enable-expert-parallel and --data-parallel-size 2 or more"
            )
        if self.enable_dbo:
            self._check_dbo()
        if self.overlap in ("sbo", "auto"):
            self._check_sbo()

    @property
    def enable_dbo(self) -> bool:
        """Steps may microbatch: DBO, or auto (which tries it)."""
        return self.overlap in ("dbo", "auto")

    def _check_sbo(self) -> None:
        if self.sbo_rounds < 1:
            raise ValueError(f"sbo_rounds must be >= 1 group of experts, got {self.sbo_rounds}")
        if not BACKENDS[self.all2all_backend].supports_sbo:
            raise ValueError(f"all2all_backend={self.all2all_backend!r} cannot exchange tokens in rounds; choose "
                             "another backend or another --overlap")  # fmt: skip

    def _check_dbo(self) -> None:
        if self.ubatch_size < 2:
            raise ValueError(f"ubatch_size must be >= 2 microbatches, got {self.ubatch_size}")
        for name in ("dbo_decode_token_threshold", "dbo_prefill_token_threshold"):
            if getattr(self, name) < self.ubatch_size:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) is below ubatch_size ({self.ubatch_size}): every microbatch "
                    f"needs a token; raise {name} to at least {self.ubatch_size}"
                )
        if not BACKENDS[self.all2all_backend].supports_dbo:
            raise ValueError(f"all2all_backend={self.all2all_backend!r} cannot yield between launch and wait; "
                             "choose a backend that supports DBO or turn DBO off")  # fmt: skip

    @property
    def ep_size(self) -> int:
        return self.data_parallel_size if self.enable_expert_parallel else 1

    @property
    def local_size(self) -> int:
        """DP ranks per node."""
        return self.data_parallel_size // self.nnodes

    @property
    def local_ranks(self) -> range:
        return range(self.node_rank * self.local_size, (self.node_rank + 1) * self.local_size)


# "batched": decode steps in one vectorised pass over padded caches (MLA in the absorbed latent form), no loop
# over requests and no host synchronisation; prefill and mixed steps keep the reference path.
# "triton": decode steps in a fused paged-KV Triton kernel (layers/triton_decode.py) that reads each request's
# blocks in place instead of gathering padded copies; CUDA only, or Triton's CPU interpreter with TRITON_INTERPRET=1.
ATTENTION_BACKENDS = ("reference", "batched", "triton")
# "grouped_mm": routed experts as two torch._grouped_mm calls over expert-sorted tokens (GPU: bfloat16).
# "triton": routed experts as two fused grouped-GEMM Triton kernels over expert-sorted, BLOCK_M-padded tokens
# (layers/triton_moe.py), up to 8192 (token, expert) pairs in bfloat16 (decode-sized; larger batches take
# grouped_mm, faster there); the GPU default. CUDA only, or the interpreter with TRITON_INTERPRET=1.
MOE_BACKENDS = ("reference", "grouped_mm", "triton")


def _check_triton(device: torch.device, flag: str, fallback: str) -> None:
    """flag: the option that chose Triton ("attention_backend"); fallback: what to choose instead on CPU."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"{flag}='triton' needs the triton package (pip install triton); "
                         f"or choose {flag}={fallback!r}")  # fmt: skip
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{flag}='triton' runs its kernels on a CUDA GPU; on CPU choose {fallback!r} or "
                         "'reference' (or set TRITON_INTERPRET=1 to run them in Triton's slow interpreter, "
                         "for tests)")  # fmt: skip


@dataclass(frozen=True)
class EngineConfig:
    model_path: str | None  # None: the built-in model
    tokenizer_path: str | None
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    dtype: torch.dtype
    load_format: str
    seed: int
    parallel: ParallelConfig = ParallelConfig()
    attention_backend: str = "reference"  # "reference" (the per-request oracle), "batched" or "triton" (decode steps)
    moe_backend: str = "reference"  # "reference" (a loop over experts, the oracle), "grouped_mm" or "triton"
    enforce_eager: bool = False  # no CUDA graphs
    compilation_level: int = 0  # torch.compile of the decoder layers when > 0 (twinbatch/compilation.py)

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend={self.attention_backend!r}; choose auto or one of "
                             f"{', '.join(ATTENTION_BACKENDS)}")  # fmt: skip
        if self.attention_backend == "triton":
            _check_triton(self.device, "attention_backend", "batched")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend={self.moe_backend!r}; choose auto or one of {', '.join(MOE_BACKENDS)}")
        if self.moe_backend == "triton":
            _check_triton(self.device, "moe_backend", "grouped_mm")
        if self.model.num_experts % self.parallel.ep_size:
            raise ValueError(
                f"{self.model.num_experts} routed experts do not split evenly over {self.parallel.ep_size} "
                "expert-parallel ranks; choose a data_parallel_size that divides the expert count"
            )
        local = self.model.num_experts // self.parallel.ep_size
        if self.parallel.overlap in ("sbo", "auto") and self.parallel.sbo_rounds > local:
            raise ValueError(f"sbo_rounds ({self.parallel.sbo_rounds}) exceeds the {local} routed experts of each "
                             f"expert-parallel rank; choose at most {local} rounds")  # fmt: skip
        usable = self.cache.num_blocks - 1  # block 0 takes padding writes
        if self.scheduler.max_model_len > usable * self.cache.block_size:
            raise ValueError(
                f"max_model_len ({self.scheduler.max_model_len}) does not fit in the KV cache "
                f"({usable} usable blocks x {self.cache.block_size} tokens); lower max_model_len "
                "or give the cache more memory (num_gpu_blocks_override / kv_cache_memory_bytes)"
            )
