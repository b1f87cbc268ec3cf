"""twinbatch: a compact Mixture-of-Experts inference engine with dual-batch overlap."""

from twinbatch.entrypoints.llm import LLM
from twinbatch.outputs import CompletionOutput, RequestOutput
from twinbatch.sampling_params import SamplingParams
from twinbatch.version import __version__

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "__version__"]
