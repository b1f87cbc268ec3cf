"""Everything one forward pass needs besides the tensors it transforms. Passed down explicitly, so every
microbatch carries its own."""

from __future__ import annotations

from dataclasses import dataclass

from twinbatch.layers.attention import AttentionMetadata


@dataclass
class ForwardContext:
    attn: AttentionMetadata
    max_tokens_across_dp: int  # the largest token count of any DP rank this step (all-to-all buffer sizes)
