"""The collectives the all-to-all backends issue, behind one switch for benchmarks.

Each one starts asynchronously and appends its work to the `works` list it is given, returning nothing: a
compiled layer breaks its graph at these calls, and a call whose result fed `works.append` left that bound
method on Dynamo's stack, where its guard failed on every call (a recompilation per call, until Dynamo gave up
on the frame after 64).

`with COLLECTIVES.skipped():` replaces communication with a local copy of the same shape (a compute-only step);
`COLLECTIVES.recording = []` notes every collective so `replay` can time the communication alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from twinbatch.compilation import opaque

# torch 2.14 renamed these (the old names warn); torch 2.11 has only the old ones
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


class _Done:
    def wait(self) -> bool:
        return True


@dataclass
class Collectives:
    skip: bool = False
    recording: list[tuple[str, torch.Tensor, torch.Tensor, dict[str, Any]]] | None = None
    _done: _Done = field(default_factory=_Done)

    @opaque
    def all_to_all(
        self, out: torch.Tensor, inp: torch.Tensor, works: list[Any], out_splits: list[int] | None = None,
        in_splits: list[int] | None = None, *, group: dist.ProcessGroup,
    ) -> None:  # fmt: skip
        kwargs = {"output_split_sizes": out_splits, "input_split_sizes": in_splits, "group": group}
        if self._note("all_to_all", out, inp, kwargs):
            n = min(out.shape[0], inp.shape[0])
            out.zero_()[:n].copy_(inp[:n])
            works.append(self._done)
        else:
            works.append(dist.all_to_all_single(out, inp, async_op=True, **kwargs))

    @opaque
    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, works: list[Any], *, group: dist.ProcessGroup) -> None:
        if self._note("all_gather", out, inp, {"group": group}):
            out.view(-1, *inp.shape).copy_(inp)
            works.append(self._done)
        else:
            works.append(_all_gather(out, inp, group=group, async_op=True))

    @opaque
    def reduce_scatter(
        self, out: torch.Tensor, inp: torch.Tensor, works: list[Any], *, group: dist.ProcessGroup
    ) -> None:
        if self._note("reduce_scatter", out, inp, {"group": group}):
            out.copy_(inp.view(-1, *out.shape)[dist.get_rank(group)])
            works.append(self._done)
        else:
            works.append(_reduce_scatter(out, inp, group=group, async_op=True))

    @contextlib.contextmanager
    def skipped(self) -> Iterator[None]:
        """Communication replaced by local copies inside the block (compute-only steps), then as it was."""
        before, self.skip = self.skip, True
        try:
            yield
        finally:
            self.skip = before

    def _note(self, kind: str, out: torch.Tensor, inp: torch.Tensor, kwargs: dict[str, Any]) -> bool:
        """Records the call if recording; returns True when communication is to be skipped."""
        if self.recording is not None:
            self.recording.append((kind, torch.empty_like(out), inp.clone(), kwargs))
        return self.skip

    @staticmethod
    @torch.inference_mode()  # the recorded tensors are inference tensors
    def replay(recorded: list[tuple[str, torch.Tensor, torch.Tensor, dict[str, Any]]]) -> None:
        """Issues the recorded collectives again, one after another: the step's communication alone."""
        for kind, out, inp, kwargs in recorded:
            if kind == "all_to_all":
                dist.all_to_all_single(out, inp, **kwargs)
            elif kind == "all_gather":
                _all_gather(out, inp, group=kwargs["group"])
            else:
                _reduce_scatter(out, inp, group=kwargs["group"])


COLLECTIVES = Collectives()
