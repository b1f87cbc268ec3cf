"""The HBM roofline of a model step: the least time it can take if every byte it must read crosses HBM once."""

from __future__ import annotations

import torch

from twinbatch.core.scheduler import SchedulerOutput
from twinbatch.worker.model_runner import ModelRunner


def hbm_roofline_ms(runner: ModelRunner, batch: SchedulerOutput, bandwidth_gbs: float) -> float:
    """The least time one step can take on this rank if every byte it must read crosses HBM once: every
    parameter (the embedding only for its looked-up rows; all local experts, which a large batch hits) plus
    every cached KV entry the decodes attend to."""
    model = runner.model
    embed = model.model.embed_tokens.weight
    tied = embed is model.lm_head.weight
    params = sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)
    params += 0 if tied else batch.num_tokens * embed.shape[1] * embed.element_size()
    kv = batch.num_context_tokens * sum(c[0, 0].numel() * c.element_size() for c in runner.kv_caches)
    return 1e3 * (params + kv) / (bandwidth_gbs * 1e9)


def hbm_bandwidth_gbs(device: torch.device, override: float | None) -> float | None:
    """Peak HBM bandwidth by GPU model (data sheets), unless given."""
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_GBS.items() if key in name), None)


HBM_GBS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100": 3350.0, "H20": 4000.0, "A100": 2039.0}
