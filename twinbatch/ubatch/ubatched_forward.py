"""One model forward run as microbatches on the DBO runtime's threads."""

from __future__ import annotations

import functools

import torch

from twinbatch.forward_context import ForwardContext
from twinbatch.models.causal_lm import CausalLM
from twinbatch.ubatch.decision import ubatch_bounds
from twinbatch.ubatch.runtime import UBatchContext, UBatchRuntime
from twinbatch.ubatch.split import UBatchSlice, slice_requests, split_attention_metadata
from twinbatch.worker.model_runner import StepInputs


class UBatchedForward:
    def __init__(self, model: CausalLM, num_ubatches: int, device: torch.device) -> None:
        self.model, self.n, self.device = model, num_ubatches, device
        self.runtime = UBatchRuntime(num_ubatches)
        self.last_trace: list[tuple[int, str]] = []  # (microbatch, yield label) of the last step, in order

    def __call__(self, inputs: StepInputs) -> torch.Tensor:
        """inputs padded to the same token count on every DP rank -> hidden states [num_tokens, hidden]."""
        num_tokens = inputs.attn.num_tokens
        slices = slice_requests(inputs.attn.host[0], ubatch_bounds(num_tokens, self.n))
        hidden = torch.empty(num_tokens, self.model.config.hidden_size, dtype=self.model.lm_head.weight.dtype,
                             device=self.device)  # fmt: skip
        work = [functools.partial(self._forward, inputs, s, hidden) for s in slices]
        self.last_trace = self.runtime.run(work)
        return hidden

    def _forward(self, inputs: StepInputs, s: UBatchSlice, out: torch.Tensor, ubatch: UBatchContext) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        ctx = ForwardContext(split_attention_metadata(inputs.attn, s), s.tokens.stop - s.tokens.start, ubatch)
        with torch.inference_mode():  # also per thread
            out[s.tokens] = self.model(inputs.input_ids[s.tokens], inputs.positions[s.tokens], ctx)
