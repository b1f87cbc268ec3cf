"""torch.compile of the decoder layers: vLLM's `-O` / `--compilation-config` level (0 turns it off).

Counted on a decode step, a decoder layer is some 100 kernels, most of them tiny elementwise ones (norms in
float32, rotary, routing, the all-to-all's buffer building, the experts' bookkeeping); at a few microseconds
each they, not the weights, set the step time. With compilation on, Model runs every layer of every step
through one torch.compile'd DecoderLayer.forward. One function for all layers: parameters are graph inputs, so
it compiles once per layer kind (dense / MoE), step kind (decode / prefill) and microbatched or not, with
dynamic sizes for every batch. Inductor fuses the small kernels into a few.

What stays outside the compiled graphs, marked with `opaque`: the collectives and their waits, the DBO yields,
the hand-written Triton kernels, the KV-cache write and the reference prefill attention (a loop over the
requests on the host; the packed layout's attention, which prefill graphs take, has none). So a compiled layer
issues the same collectives, and yields at the same points, as an eager one, and DBO's overlap and the
CUDA-graph capture of a whole step hold. The model runner compiles while it is
built, on each rank alone (ModelRunner._compile_alone).

Level 0 is off, any other level on; the default is on for CUDA where decode steps can be CUDA graphs, off on
CPU (which runs the reference paths, the tests' oracle). Prefill and mixed steps run the same compiled layer:
eager, a layer's host Python takes about as long as the GPU needs for a 2048-token microbatch
(docs/performance.md, kernel choices).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

# torch.compile's backend; tests set "eager" (Dynamo's tracing and graph breaks without Inductor's code generation)
BACKEND = os.environ.get("TWINBATCH_COMPILE_BACKEND", "inductor")
RECOMPILE_LIMIT = 64  # layer kinds x decode or prefill x microbatched or not x specialisations stay well below this


def opaque(fn: F) -> F:
    """Keeps fn out of compiled graphs (collectives, waits, yields, Triton launches): it runs as written."""
    return torch.compiler.disable(fn, recursive=True)


def parse_level(value: str | int | None, default: int) -> int:
    """`-O3`, `--compilation-config 0` or `--compilation-config '{"level": 0}'` -> the level."""
    if value is None:
        return default
    if isinstance(value, int):
        level: Any = value
    else:
        try:
            level = json.loads(value)
        except json.JSONDecodeError:
            level = None
        level = level.get("level", level.get("mode")) if isinstance(level, dict) else level
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 3:
        raise ValueError(
            f"compilation_config={value!r}; give a level 0-3 (-O0 turns torch.compile off) or a JSON object "
            "such as '{\"level\": 0}'"
        )
    return level


def compile_layer(forward: F) -> F:
    """forward under torch.compile, one per process and backend: engines built in one process (tests, the
    oracle runs beside the fast ones) reuse what an earlier one compiled wherever the guards allow."""
    return _compiled(forward, BACKEND)


@functools.cache
def _compiled(forward: F, backend: str) -> F:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = torch.compile(forward, backend=backend, dynamic=True)

    @functools.wraps(forward)
    def run(*args: Any) -> Any:
        try:
            return compiled(*args)
        except torch._dynamo.exc.TorchDynamoException as e:
            raise RuntimeError(
                f"torch.compile failed on a decoder layer ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                "-O0 (--compilation-config 0) runs the layers uncompiled"
            ) from e

    return run  # type: ignore[return-value]
