"""Everything one forward pass needs besides the tensors it transforms. Passed down explicitly, so every
microbatch carries its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twinbatch.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from twinbatch.ubatch.runtime import UBatchContext


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    max_tokens_across_dp: int  # the largest token count of any DP rank in this (micro)batch: all-to-all sizes
    ubatch: UBatchContext | None = None  # set when this forward is one microbatch of a DBO step
