"""Rotary position embedding: default and YaRN, in interleaved-pair (DeepSeek) or half-split (Qwen) layout."""

import math

import torch
from torch import nn

from twinbatch.config.model import RopeConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(rope: RopeConfig, head_dim: int) -> float:
    """1/sqrt(d), times YaRN's mscale(factor, mscale_all_dim)^2 correction when YaRN is on."""
    scale = head_dim**-0.5
    if rope.rope_type == "yarn" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def _yarn_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1.0 - ramp
    inv_freq = (1.0 / (rope.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    if rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rope.factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, dim: int, max_positions: int) -> None:
        super().__init__()
        self.interleaved = rope.interleaved
        if rope.rope_type == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(rope, dim)
        else:
            inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            attention_factor = 1.0
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq
        # [max_positions, dim // 2] each, float32, YaRN's attention factor folded in
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Rotates each x [num_tokens, num_heads, dim] at its token's position."""
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]
        return [self._rotate(x, cos, sin) for x in xs]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).type_as(x)
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)
