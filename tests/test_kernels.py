"""Fast paths against the reference paths on the same inputs (CPU here; tests/test_gpu.py repeats on GPU)."""

import pytest
import torch

from twinbatch.layers.attention import AttentionMetadata, gather_batched
from twinbatch.layers.moe import Experts


def make_experts(dtype: torch.dtype) -> Experts:
    torch.manual_seed(0)
    experts = Experts(6, 32, 16).to(dtype)
    for p in experts.parameters():
        p.data.normal_(0, 0.2)
    return experts


@pytest.mark.parametrize(("dtype", "atol", "rtol"), [(torch.float32, 1e-5, 0), (torch.bfloat16, 2e-2, 1.6e-2)])
@pytest.mark.parametrize("num_tokens", [0, 1, 9])
def test_grouped_mm_experts_match_reference(dtype: torch.dtype, atol: float, rtol: float, num_tokens: int) -> None:
    """bf16: the reference rounds each expert's output before adding, grouped_mm sums in float32 and rounds
    once, so the two may differ by an ulp (0.03 at 4.0)."""
    experts = make_experts(dtype)
    x = torch.randn(num_tokens, 32, dtype=dtype)
    ids = torch.randint(0, 8, (num_tokens, 3))  # ids 6 and 7 belong to another rank: skipped
    weights = torch.rand(num_tokens, 3)
    reference = experts(x, weights, ids)
    experts.backend = "grouped_mm"
    torch.testing.assert_close(experts(x, weights, ids), reference, atol=atol, rtol=rtol)


def test_batched_gather_masks_unwritten_cache() -> None:
    """Slots past a request's length may hold NaN (never-written memory): they come back as 0 and masked."""
    cache = torch.full((6, 4, 3), float("nan"))
    cache[1, :3], cache[4, :2] = 1.0, 2.0  # request 0: 3 tokens in block 1; request 1: 6 tokens in blocks 4, 1
    cache[1, 3] = 3.0
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 2]), seq_lens=torch.tensor([3, 6]),
        block_tables=torch.tensor([[1, 0], [1, 4]]), slot_mapping=torch.tensor([2, 17]), block_size=4,
        decode_only=True, max_seq_len=6,
    )  # fmt: skip
    entries, valid = gather_batched(cache, meta)
    assert entries.shape == (2, 8, 3) and not entries.isnan().any()
    assert valid.tolist() == [[True] * 3 + [False] * 5, [True] * 6 + [False] * 2]
    assert entries[1, :6, 0].tolist() == [1, 1, 1, 3, 2, 2] and entries[1, 6:].abs().sum() == 0
