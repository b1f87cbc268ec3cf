"""twinbatch: a compact Mixture-of-Experts inference engine with dual-batch overlap."""

from twinbatch.entrypoints.llm import LLM
from twinbatch.outputs import CompletionOutput, RequestOutput
from twinbatch.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
