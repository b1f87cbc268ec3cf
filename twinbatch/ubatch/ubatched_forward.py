"""One model forward run as microbatches on the DBO runtime's threads."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from twinbatch.forward_context import ForwardContext
from twinbatch.models.causal_lm import CausalLM
from twinbatch.ubatch.decision import ubatch_bounds
from twinbatch.ubatch.runtime import UBatchContext, UBatchRuntime
from twinbatch.ubatch.split import UBatchSlice, packed_slices, slice_requests, split_attention_metadata
from twinbatch.worker.inputs import StepInputs


class UBatchedForward:
    def __init__(self, model: CausalLM, num_ubatches: int, device: torch.device) -> None:
        self.model, self.n, self.device = model, num_ubatches, device
        self.runtime = UBatchRuntime(num_ubatches)
        self.last_trace: list[tuple[int, str]] = []  # (microbatch, yield label) of the last step, in order

    def __call__(self, inputs: StepInputs, query_starts: list[int] | None = None) -> torch.Tensor:
        """inputs padded to the same token count on every DP rank -> hidden states [num_tokens, hidden].
        query_starts: the requests' token offsets on the host, when known without reading the device (a CUDA
        graph capture may not synchronise); the packed layout needs none."""
        attn, bounds = inputs.attn, ubatch_bounds(inputs.attn.num_tokens, self.n)
        if attn.context_bound:
            slices = packed_slices(attn.num_reqs, bounds)
        else:
            slices = slice_requests(query_starts if query_starts is not None else attn.host[0], bounds)
        num_tokens = attn.num_tokens
        hidden = torch.empty(num_tokens, self.model.config.hidden_size, dtype=self.model.lm_head.weight.dtype,
                             device=self.device)  # fmt: skip
        # every microbatch issues its kernels on the caller's stream (under capture: the capturing stream)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        work = [functools.partial(self._forward, inputs, s, hidden, stream) for s in slices]
        self.last_trace = self.runtime.run(work)
        return hidden

    def _forward(
        self, inputs: StepInputs, s: UBatchSlice, out: torch.Tensor, stream: torch.cuda.Stream | None,
        ubatch: UBatchContext,
    ) -> None:  # fmt: skip
        # every kernel of the microbatch, the metadata split included, on the caller's stream: work left on this
        # thread's default stream would escape a CUDA-graph capture (run once, its memory freed and reused)
        with torch.inference_mode(), _on_stream(self.device, stream):  # both are per thread
            ctx = ForwardContext(split_attention_metadata(inputs.attn, s), s.tokens.stop - s.tokens.start, ubatch)
            out[s.tokens] = self.model(inputs.input_ids[s.tokens], inputs.positions[s.tokens], ctx)


@contextlib.contextmanager
def _on_stream(device: torch.device, stream: torch.cuda.Stream | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    torch.cuda.set_device(device)  # the current device is per thread too
    with torch.cuda.stream(stream):
        yield
