"""A step's model inputs: the persistent buffers they live in and the views one step takes of them.
ModelRunner.prepare_inputs fills them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from twinbatch.layers.attention import AttentionMetadata


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampled], the last new token of each request that samples
    query_starts: list[int] | None = None  # attn.query_start_loc on the host, where known without a device read
    # (row of input_ids, request id) of tokens sampled by the step before and still on the device
    pending: list[tuple[int, str]] = field(default_factory=list)


class InputBuffers:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks_per_req: int, device: torch.device) -> None:
        def buf(*shape: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.input_ids = buf(max_tokens, dtype=torch.int64)
        self.positions = buf(max_tokens, dtype=torch.int64)
        self.slot_mapping = buf(max_tokens, dtype=torch.int64)
        self.query_start_loc = buf(max_reqs + 1)
        self.seq_lens = buf(max_reqs)
        self.block_tables = buf(max_reqs, max_blocks_per_req)
        self.logits_indices = buf(max_reqs, dtype=torch.int64)
