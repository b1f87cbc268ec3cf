"""Expert-parallel all-to-all backends, chosen by `--all2all-backend`."""

import torch.distributed as dist

from twinbatch.distributed.all2all.all2allv import All2Allv
from twinbatch.distributed.all2all.allgather_reducescatter import AllGatherReduceScatter
from twinbatch.distributed.all2all.base import All2AllBackend, ExpertInput, Handle
from twinbatch.distributed.all2all.fixed_capacity import FixedCapacityAll2All

BACKENDS: dict[str, type[All2AllBackend]] = {
    "allgather_reducescatter": AllGatherReduceScatter,
    "all2all": FixedCapacityAll2All,
    "all2allv": All2Allv,
}


def make_all2all(name: str, group: dist.ProcessGroup, num_experts: int) -> All2AllBackend:
    return BACKENDS[name](group, num_experts)


__all__ = ["BACKENDS", "All2AllBackend", "ExpertInput", "Handle", "make_all2all"]
