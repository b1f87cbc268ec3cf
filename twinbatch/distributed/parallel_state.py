"""Process groups of one DP rank: torch.distributed with env:// rendezvous (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

# Bound on how long a collective waits for a peer: a dead or stuck rank turns into an error, not a hang.
TIMEOUT_S = float(os.environ.get("TWINBATCH_DIST_TIMEOUT_S", "60"))


@dataclass
class ParallelState:
    dp_rank: int = 0
    dp_size: int = 1
    cpu_group: dist.ProcessGroup | None = None  # gloo: the per-step DP sync
    ep_group: dist.ProcessGroup | None = None  # the all-to-alls of expert parallelism

    @property
    def ep_size(self) -> int:
        return 1 if self.ep_group is None else dist.get_world_size(self.ep_group)

    @property
    def ep_rank(self) -> int:
        return 0 if self.ep_group is None else dist.get_rank(self.ep_group)


class Rendezvous(Protocol):
    """Where and as whom a process joins the DP world (config.ParallelConfig)."""

    data_parallel_rank: int
    data_parallel_size: int
    master_addr: str
    master_port: int
    enable_expert_parallel: bool


def init_distributed(parallel: Rendezvous, device: torch.device) -> ParallelState:
    """Joins the DP world as rank parallel.data_parallel_rank. Every DP rank is also an EP rank. One rank with
    expert parallelism is a world of one, whose all-to-alls are local copies (bench step measures the overlap
    modes' compute on one GPU this way)."""
    if parallel.data_parallel_size == 1 and not parallel.enable_expert_parallel:
        return ParallelState()
    os.environ.update(MASTER_ADDR=parallel.master_addr, MASTER_PORT=str(parallel.master_port))
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # our ranks host their own store, also under torchrun
    rank, size = parallel.data_parallel_rank, parallel.data_parallel_size
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method="env://", rank=rank, world_size=size, timeout=timedelta(seconds=TIMEOUT_S),
        device_id=device if device.type == "cuda" else None,
    )  # fmt: skip
    world = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=TIMEOUT_S)) if backend == "nccl" else world
    return ParallelState(rank, size, cpu_group, world if parallel.enable_expert_parallel else None)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
