"""Cutting one step's inputs into microbatches, each with attention metadata of its own.

The padded token range is cut into near-equal slices (ubatch_bounds); padding sits at the end, so the last
microbatch absorbs it. A request straddling a cut is split: its later part is a chunked-prefill continuation
that attends to the KV its earlier part wrote (earlier microbatches run each layer first).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from twinbatch.layers.attention import AttentionMetadata


@dataclass(frozen=True)
class UBatchSlice:
    tokens: slice  # of the padded batch
    requests: slice  # requests with at least one token in `tokens`


def slice_requests(query_start_loc: list[int], bounds: list[int]) -> list[UBatchSlice]:
    """query_start_loc: [num_reqs + 1] host offsets of the real tokens; bounds: microbatch token offsets."""
    num_reqs, slices = len(query_start_loc) - 1, []
    for lo, hi in itertools.pairwise(bounds):
        first = bisect.bisect_right(query_start_loc, lo) - 1  # the request holding token lo
        last = bisect.bisect_left(query_start_loc, hi)  # one past the request holding token hi - 1
        slices.append(UBatchSlice(slice(lo, hi), slice(min(first, num_reqs), min(last, num_reqs))))
    return slices


def packed_slices(num_reqs: int, bounds: list[int]) -> list[UBatchSlice]:
    """Microbatches of a step in the packed layout (AttentionMetadata.context_bound): each takes every request
    row, with its query range cut to the microbatch on the device, so the cut needs no host offsets."""
    return [UBatchSlice(slice(lo, hi), slice(0, num_reqs)) for lo, hi in itertools.pairwise(bounds)]


def split_attention_metadata(attn: AttentionMetadata, s: UBatchSlice) -> AttentionMetadata:
    """The metadata of one microbatch: query starts rebased to its first token, sequence lengths cut where a
    request continues in a later microbatch, block tables by request, slot mapping by token."""
    lo, hi, reqs = s.tokens.start, s.tokens.stop, s.requests
    starts = attn.query_start_loc[reqs.start : reqs.stop + 1].clamp(lo, hi) - lo
    ends = attn.query_start_loc[reqs.start + 1 : reqs.stop + 1]
    # tokens after this slice are not in the cache yet (a request wholly after it, only possible in the packed
    # layout, keeps none: it has no query here)
    seq_lens = (attn.seq_lens[reqs] - (ends - hi).clamp(min=0)).clamp(min=0)
    return AttentionMetadata(
        query_start_loc=starts.to(attn.query_start_loc.dtype),
        seq_lens=seq_lens.to(attn.seq_lens.dtype),
        block_tables=attn.block_tables[reqs],
        slot_mapping=attn.slot_mapping[lo:hi],
        block_size=attn.block_size,
        decode_only=attn.decode_only,
        max_seq_len=attn.max_seq_len,
        context_bound=attn.context_bound,
    )
