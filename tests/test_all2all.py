"""Expert-parallel all-to-all backends on 2 gloo CPU processes, against the single-process oracle: the full
`Experts` (all experts local) for the bare dispatch/combine round trip, and `MoE` without a group for the layer.

Each test spawns once and loops over every backend and case; an assertion in a rank re-raises in the parent.
"""

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from twinbatch.config.model import ModelConfig
from twinbatch.distributed.all2all import BACKENDS, All2AllBackend, ExpertInput, make_all2all
from twinbatch.layers.forward_context import ForwardContext
from twinbatch.layers.moe import ExpertPlacement, Experts, MoE
from twinbatch.models.loader import init_dummy_weights
from twinbatch.models.presets import PRESETS
from twinbatch.ops import cumsum_rows

WORLD, E, H, FFN, K = 2, 8, 32, 16, 2
ALL, LOW, HIGH = range(E), range(E // 2), range(E // 2, E)  # LOW: rank 0's experts, HIGH: rank 1's
# (name, tokens per rank, experts each rank's tokens may choose)
CASES: list[tuple[str, tuple[int, int], tuple[range, range]]] = [
    ("uneven", (5, 9), (ALL, ALL)),
    ("rank0_keeps_local", (6, 7), (LOW, ALL)),
    ("rank1_keeps_local", (6, 7), (ALL, HIGH)),
    ("nothing_crosses", (4, 3), (LOW, HIGH)),
    ("all_remote", (3, 4), (HIGH, LOW)),
    ("rank0_empty", (0, 7), (ALL, ALL)),
    ("rank1_empty", (7, 0), (ALL, ALL)),
    ("one_token_each", (1, 1), (ALL, ALL)),
]
BF16_REL_TOL = 1e-2  # of the output's largest magnitude; partial sums may round differently per rank


def _entry(rank: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    url = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        fn(rank, *args)
    except RuntimeError as e:
        if "peer" in str(e):  # a consequence of the other rank failing: let that rank's error be the one reported
            time.sleep(5)
        raise
    dist.destroy_process_group()


def _spawn(fn: Callable[..., None], *args: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_entry, args=(port, fn, args), nprocs=WORLD)


def make_inputs(case: int, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s tokens in case `case`, reproducible on any rank: x [n, H], weights [n, K] > 0, distinct ids."""
    _, counts, allowed = CASES[case]
    n, pool = counts[rank], torch.tensor(list(allowed[rank]))
    g = torch.Generator().manual_seed(100 * case + rank)
    x = torch.randn(n, H, generator=g).to(dtype)
    ids = pool[torch.rand(n, len(pool), generator=g).argsort(dim=1)[:, :K]]
    return x, torch.rand(n, K, generator=g) + 0.1, ids


def make_experts(rank: int, dtype: torch.dtype) -> tuple[Experts, Experts]:
    """-> (all E experts, this rank's slice of the same weights)."""
    full, local = Experts(E, H, FFN), Experts(E // WORLD, H, FFN, expert_offset=rank * E // WORLD)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full.gate_up_proj.normal_(0.0, H**-0.5, generator=g)
        full.down_proj.normal_(0.0, FFN**-0.5, generator=g)
        mine = slice(local.expert_offset, local.expert_offset + local.num_experts)
        local.gate_up_proj.copy_(full.gate_up_proj[mine])
        local.down_proj.copy_(full.down_proj[mine])
    return full.to(dtype), local.to(dtype)


@contextlib.contextmanager
def labelled(tag: str) -> Iterator[None]:
    """Names the backend and case in the traceback of anything that fails inside."""
    try:
        yield
    except Exception as e:
        e.add_note(tag)
        raise


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got.shape, got.dtype) == (want.shape, want.dtype), f"{got.shape} {got.dtype} != {want.shape}"
    scale = float(want.abs().amax()) if want.numel() else 1.0
    atol = 1e-5 if want.dtype == torch.float32 else BF16_REL_TOL * scale
    torch.testing.assert_close(got, want, rtol=0, atol=atol)


def round_trip(
    backend: All2AllBackend, local: Experts, inputs: tuple[torch.Tensor, ...], max_tokens: int
) -> tuple[ExpertInput, torch.Tensor]:
    handle = backend.dispatch_launch(*inputs, max_tokens)
    recv = backend.dispatch_wait(handle)
    backend.combine_launch(local(recv.x, recv.topk_weights, recv.local_ids), handle)
    return recv, backend.combine_wait(handle)


def check_received(backend: All2AllBackend, name: str, recv: ExpertInput, case: int) -> None:
    """Each local expert receives exactly the (token, expert) pairs all ranks route to it."""
    ids = torch.cat([make_inputs(case, r, torch.float32)[2].flatten() for r in range(WORLD)])
    n_local = backend.num_local_experts
    want = torch.bincount(ids, minlength=E)[backend.expert_offset : backend.expert_offset + n_local]
    valid = recv.local_ids[(recv.local_ids >= 0) & (recv.local_ids < n_local)]
    got = torch.bincount(valid, minlength=n_local)
    assert torch.equal(got, want), f"(token, expert) pairs received per local expert {name}: {got} != {want}"


def _backends_worker(rank: int) -> None:
    group = dist.group.WORLD
    for dtype in (torch.float32, torch.bfloat16):
        full, local = make_experts(rank, dtype)
        with torch.no_grad():
            for name in BACKENDS:
                backend = BACKENDS[name](group, E)
                for case, (cname, counts, _) in enumerate(CASES):
                    with labelled(f"rank {rank} {name} {cname} {dtype}"):
                        inputs = make_inputs(case, rank, dtype)
                        recv, out = round_trip(backend, local, inputs, max(counts))
                        assert_close(out, full(*inputs))
                        check_received(backend, name, recv, case)
                with labelled(f"rank {rank} {name} two round trips in flight {dtype}"):
                    check_overlap(backend, local, rank, dtype)


def check_overlap(backend: All2AllBackend, local: Experts, rank: int, dtype: torch.dtype) -> None:
    """Two round trips in flight at once (as under dual-batch overlap) equal the same two done one at a time."""
    a, b = make_inputs(0, rank, dtype), make_inputs(1, rank, dtype)
    max_a, max_b = max(CASES[0][1]), max(CASES[1][1])
    want_a, want_b = round_trip(backend, local, a, max_a)[1], round_trip(backend, local, b, max_b)[1]
    ha, hb = backend.dispatch_launch(*a, max_a), backend.dispatch_launch(*b, max_b)
    rb, ra = backend.dispatch_wait(hb), backend.dispatch_wait(ha)
    backend.combine_launch(local(rb.x, rb.topk_weights, rb.local_ids), hb)
    backend.combine_launch(local(ra.x, ra.topk_weights, ra.local_ids), ha)
    got_a, got_b = backend.combine_wait(ha), backend.combine_wait(hb)
    assert torch.equal(got_a, want_a) and torch.equal(got_b, want_b)


def test_backends_match_single_process_experts() -> None:
    _spawn(_backends_worker)


def expert_bytes(moe: MoE) -> int:
    return sum(p.numel() * p.element_size() for p in moe.experts.parameters())


def _moe_worker(rank: int) -> None:
    cfg = ModelConfig.from_dict({**PRESETS["twinbatch/tiny-deepseek-v2"], "vocab_size": 64})
    full = MoE(cfg, ExpertPlacement())
    init_dummy_weights(full, seed=3)
    n_local = cfg.num_experts // WORLD
    mine = slice(rank * n_local, (rank + 1) * n_local)
    for name in BACKENDS:
        ep = MoE(cfg, ExpertPlacement(rank, WORLD, make_all2all(name, dist.group.WORLD, cfg.num_experts)))
        init_dummy_weights(ep, seed=3)
        full_params = dict(full.named_parameters())
        for pname, p in ep.named_parameters():
            want = full_params[pname][mine] if pname.startswith("experts.") else full_params[pname]
            assert torch.equal(p, want), f"rank {rank} {name}: {pname} differs from the full layer's"
        assert 2 * expert_bytes(ep) == expert_bytes(full), f"rank {rank} {name}: expert bytes"
        for counts in ((5, 9), (0, 3), (1, 1)):
            x = torch.randn(counts[rank], cfg.hidden_size, generator=torch.Generator().manual_seed(rank))
            ctx = ForwardContext(attn=None, max_tokens_across_dp=max(counts))  # type: ignore[arg-type]
            with torch.no_grad(), labelled(f"rank {rank} {name} MoE tokens per rank {counts}"):
                assert_close(ep(x, ctx), full(x, ctx))


def test_moe_layer_expert_parallel_matches_single_process() -> None:
    _spawn(_moe_worker)


def test_cumsum_rows_is_cumsum_over_tokens_eager_and_compiled() -> None:
    """The send-row positions' scan (a custom op, so Inductor keeps it whole) against torch.cumsum(0)."""
    mask = (torch.rand(300, 3, generator=torch.Generator().manual_seed(0)) > 0.4).long()
    compiled = torch.compile(lambda m: cumsum_rows(m) * 2 - 1, backend="eager", dynamic=True)
    assert torch.equal(cumsum_rows(mask), mask.cumsum(0))
    assert torch.equal(compiled(mask), mask.cumsum(0) * 2 - 1) and torch.equal(
        compiled(mask[:7]), mask[:7].cumsum(0) * 2 - 1
    )
