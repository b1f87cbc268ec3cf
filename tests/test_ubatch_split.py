"""DBO decision and split: vLLM's documented semantics, and the oracle that microbatched attention equals
whole-batch attention over a real paged KV cache."""

from typing import Any

import pytest
import torch
from helpers import MIXED, make_meta, run_attention

from twinbatch.config import ParallelConfig
from twinbatch.core.request import Request
from twinbatch.core.scheduler import ScheduledRequest, SchedulerOutput
from twinbatch.core.step_plan import Reason, StepPlanner, decide, last_ubatch_empty, ubatch_bounds
from twinbatch.distributed.all2all import BACKENDS
from twinbatch.layers.attention import PADDING_SLOT
from twinbatch.sampling_params import SamplingParams
from twinbatch.worker.ubatch.split import slice_requests, split_attention_metadata


def test_vllm_query_start_loc_rebased() -> None:
    meta = make_meta([3] * 5, [5, 7, 8, 15, 15])
    assert meta.query_start_loc.tolist() == [0, 5, 12, 20, 35, 50]
    (s,) = slice_requests(meta.host[0], [5, 20])
    assert s.requests == slice(1, 3)
    sub = split_attention_metadata(meta, s)
    assert sub.query_start_loc.tolist() == [0, 7, 15]
    assert sub.seq_lens.tolist() == [10, 11]
    assert torch.equal(sub.block_tables, meta.block_tables[1:3])
    assert torch.equal(sub.slot_mapping, meta.slot_mapping[5:20])


def test_prefill_split_on_cached_context() -> None:
    meta = make_meta([32], [8], block=16)
    first, second = (split_attention_metadata(meta, s) for s in slice_requests(meta.host[0], [0, 4, 8]))
    assert first.query_start_loc.tolist() == [0, 4] and second.query_start_loc.tolist() == [0, 4]
    assert first.seq_lens.tolist() == [36] and second.seq_lens.tolist() == [40]
    slots = [int(meta.block_tables[0, 2]) * 16 + p for p in range(8)]
    assert first.slot_mapping.tolist() == slots[:4] and second.slot_mapping.tolist() == slots[4:]
    assert torch.equal(first.block_tables, meta.block_tables) and torch.equal(second.block_tables, meta.block_tables)


def test_decodes_padding_goes_to_last_ubatch() -> None:
    assert ubatch_bounds(8, 2) == [0, 4, 8]
    meta = make_meta([5, 9, 2, 7, 3, 11], [1] * 6, pad=2)
    s0, s1 = slice_requests(meta.host[0], ubatch_bounds(8, 2))
    assert (s0.requests, s1.requests) == (slice(0, 4), slice(4, 6))
    m0, m1 = split_attention_metadata(meta, s0), split_attention_metadata(meta, s1)
    assert m0.query_start_loc.tolist() == [0, 1, 2, 3, 4] and m0.num_tokens == 4
    assert m1.query_start_loc.tolist() == [0, 1, 2] and m1.num_tokens == 4
    assert m1.seq_lens.tolist() == [4, 12]
    assert m1.slot_mapping[2:].tolist() == [PADDING_SLOT] * 2 and PADDING_SLOT not in m0.slot_mapping.tolist()


@pytest.mark.parametrize(
    ("n", "k", "bounds"),
    [(8, 2, [0, 4, 8]), (9, 2, [0, 5, 9]), (9, 3, [0, 3, 6, 9]), (10, 3, [0, 4, 7, 10]), (11, 3, [0, 4, 8, 11])],
)
def test_ubatch_bounds(n: int, k: int, bounds: list[int]) -> None:
    assert ubatch_bounds(n, k) == bounds


@pytest.mark.parametrize(
    ("tokens", "padded", "k", "empty"),
    [(0, 8, 2, True), (4, 8, 2, True), (5, 8, 2, False), (8, 8, 2, False), (6, 9, 3, True), (7, 9, 3, False)],
)
def test_last_ubatch_empty(tokens: int, padded: int, k: int, empty: bool) -> None:
    assert last_ubatch_empty(tokens, padded, k) is empty


@pytest.mark.parametrize(
    ("mine", "counts", "votes", "k", "want"),
    [
        (None, [8, 6], [True, True], 2, Reason.MICROBATCHED),
        (None, [9, 7, 8], [True, True, True], 3, Reason.MICROBATCHED),
        (Reason.BELOW_THRESHOLD, [8, 6], [False, True], 2, Reason.BELOW_THRESHOLD),
        (Reason.NOT_SUPPORTED, [8, 6], [False, False], 2, Reason.NOT_SUPPORTED),
        (None, [8, 6], [True, False], 2, Reason.RANK_DISAGREED),
        (None, [8, 0], [True, True], 2, Reason.EMPTY_MICROBATCH),
        (None, [8, 4], [True, True], 2, Reason.EMPTY_MICROBATCH),
        (None, [9, 6, 9], [True, True, True], 3, Reason.EMPTY_MICROBATCH),
    ],
)
def test_decide(mine: Reason | None, counts: list[int], votes: list[bool], k: int, want: Reason) -> None:
    assert decide(mine, counts, votes, k) is want


def dbo_config(**kw: Any) -> ParallelConfig:
    return ParallelConfig(data_parallel_size=2, enable_expert_parallel=True, overlap="dbo", **kw)


def batch(new: list[int], blocks: list[list[int]] | None = None) -> SchedulerOutput:
    blocks = blocks or [[i + 1] for i in range(len(new))]
    reqs = [Request(str(i), None, [1] * 64, SamplingParams(), block_ids=b) for i, b in enumerate(blocks)]
    return SchedulerOutput([ScheduledRequest(r, n) for r, n in zip(reqs, new, strict=True)])


BELOW = Reason.BELOW_THRESHOLD
DECODES = [([1] * 3, BELOW), ([1] * 4, None), ([1] * 15, None), ([], BELOW)]
PREFILLS = [([2] + [1] * 13, BELOW), ([10] + [1] * 5, BELOW), ([11] + [1] * 5, None), ([8, 8], None)]


@pytest.mark.parametrize(("new", "want"), DECODES + PREFILLS)
def test_vote_thresholds(new: list[int], want: Reason | None) -> None:
    assert (
        StepPlanner(dbo_config(dbo_decode_token_threshold=4, dbo_prefill_token_threshold=16)).vote(batch(new)) is want
    )


def test_vote_shared_kv_block_not_supported() -> None:
    assert StepPlanner(dbo_config()).vote(batch([1] * 40, [[2 * i + 1, 2 * i + 2] for i in range(40)])) is None
    shared = [[1, 2], [3, 4], [5, 2]] + [[10 + i] for i in range(37)]
    assert StepPlanner(dbo_config()).vote(batch([1] * 40, shared)) is Reason.NOT_SUPPORTED


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("pad", [0, 3, 5])
def test_ubatched_attention_equals_whole_batch(k: int, pad: int) -> None:
    meta = make_meta(*MIXED, pad=pad)
    bounds = ubatch_bounds(meta.num_tokens, k)
    assert set(bounds[1:-1]) - set(meta.host[0]), "some cut must straddle a request"
    whole, ubatched = run_attention(meta, None), run_attention(meta, bounds)
    torch.testing.assert_close(ubatched, whole, atol=1e-6, rtol=0)
    real = meta.host[0][-1]
    assert whole[:real].abs().sum(-1).gt(0).all() and not ubatched[real:].any()


@pytest.mark.parametrize(
    "bounds", [[0, 1, 34], [0, 2, 11, 34], [0, 16, 17, 30, 34], [0, 3, 4, 27, 37], [0, 20, 34, 38]]
)
def test_ubatched_attention_arbitrary_cuts(bounds: list[int]) -> None:
    meta = make_meta(*MIXED, pad=bounds[-1] - sum(MIXED[1]))
    torch.testing.assert_close(run_attention(meta, bounds), run_attention(meta, None), atol=1e-6, rtol=0)


def test_attention_oracle_detects_reordered_ubatches() -> None:
    meta = make_meta(*MIXED)
    whole, reordered = run_attention(meta, None), run_attention(meta, [0, 12, 34], reverse=True)
    assert not torch.allclose(reordered, whole, atol=1e-3)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"enable_expert_parallel": False}, "enable-expert-parallel"),
        ({"data_parallel_size": 1}, "enable-expert-parallel"),
        ({"ubatch_size": 2, "dbo_decode_token_threshold": 1}, "dbo_decode_token_threshold"),
        ({"ubatch_size": 3, "dbo_prefill_token_threshold": 2}, "dbo_prefill_token_threshold"),
        ({"ubatch_size": 1}, "ubatch_size must be >= 2"),
    ],
)
def test_dbo_config_rejected(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**{"data_parallel_size": 2, "enable_expert_parallel": True, "overlap": "dbo", **kw})


def test_dbo_config_accepted_and_backend_without_dbo_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in BACKENDS:
        assert dbo_config(all2all_backend=name).enable_dbo
    name = next(iter(BACKENDS))
    monkeypatch.setattr(BACKENDS[name], "supports_dbo", False)
    with pytest.raises(ValueError, match=f"all2all_backend='{name}'"):
        dbo_config(all2all_backend=name)
    assert ParallelConfig(data_parallel_size=2, enable_expert_parallel=True, all2all_backend=name).ubatch_size == 2
