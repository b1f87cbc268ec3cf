"""One model forward run as microbatches on the DBO runtime's threads."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

from twinbatch.layers.forward_context import ForwardContext
from twinbatch.models.causal_lm import CausalLM
from twinbatch.worker.inputs import StepInputs
from twinbatch.worker.ubatch.runtime import UBatchContext, UBatchRuntime
from twinbatch.worker.ubatch.split import UBatchSlice, packed_slices, slice_requests, split_attention_metadata


def dbo_comm_sms(device: torch.device) -> int:
    """TWINBATCH_DBO_COMM_SMS (vLLM: VLLM_DBO_COMM_SMS): SMs the matmuls of a microbatched GPU step leave free
    for the collectives running beside them; 0 reserves none. Default 8, the best DBO prefill measured with
    P2P off (docs/performance.md, kernel choices)."""
    value = os.environ.get("TWINBATCH_DBO_COMM_SMS", "8")
    sms = device.type == "cuda" and torch.cuda.get_device_properties(device).multi_processor_count
    if not value.isdigit() or (sms and int(value) >= sms):
        raise ValueError(f"TWINBATCH_DBO_COMM_SMS={value!r}: set it to a whole number of SMs below the GPU's SM "
                         f"count{f' ({sms})' if sms else ''}; 0 reserves none")  # fmt: skip
    return int(value)


class UBatchedForward:
    def __init__(self, model: CausalLM, num_ubatches: int, device: torch.device) -> None:
        self.model, self.n, self.device = model, num_ubatches, device
        self.runtime = UBatchRuntime(num_ubatches)
        self.comm_sms = dbo_comm_sms(device)

    def __call__(self, inputs: StepInputs, bounds: list[int] | tuple[int, ...]) -> torch.Tensor:
        """inputs padded to the same token count on every DP rank, cut at the token offsets `bounds` -> hidden
        states [num_tokens, hidden]. The cut reads the requests' offsets on the host (inputs.query_starts, else
        from the device: a CUDA graph capture may not synchronise, so it gives them); the packed layout needs
        none."""
        attn, bounds = inputs.attn, list(bounds)
        if attn.context_bound:
            slices = packed_slices(attn.num_reqs, bounds)
        else:
            starts = inputs.query_starts if inputs.query_starts is not None else attn.host[0]
            slices = slice_requests(starts, bounds)
        num_tokens = attn.num_tokens
        hidden = torch.empty(num_tokens, self.model.config.hidden_size, dtype=self.model.lm_head.weight.dtype,
                             device=self.device)  # fmt: skip
        # every microbatch issues its kernels on the caller's stream (under capture: the capturing stream)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        work = [functools.partial(self._forward, inputs, s, hidden, stream) for s in slices]
        with comm_sms_reserved(self.device, self.comm_sms):
            self.runtime.run(work)
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


@contextlib.contextmanager
def comm_sms_reserved(device: torch.device, sms: int) -> Iterator[None]:
    """Inside the block, persistent matmul kernels (cuBLASLt, and CUTLASS's grouped GEMM) size their grids to
    leave `sms` SMs free. A persistent GEMM sized for every SM has some of its blocks queued behind a
    collective's blocks, which stay resident for the whole transfer (waiting for the peer included): the GEMM
    then ends only after the collective does. Process-wide state, set while the microbatch threads run (and are
    captured: a graph keeps the grids it was captured with); cuBLAS honours it through cuBLASLt only."""
    if device.type != "cuda" or sms <= 0:
        yield
        return
    carveout, blas = torch._C._get_sm_carveout_experimental(), torch.backends.cuda.preferred_blas_library()
    torch._C._set_sm_carveout_experimental(sms)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(carveout)
        torch.backends.cuda.preferred_blas_library(blas)
