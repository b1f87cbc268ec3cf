"""Single-batch overlap (SBO) in expert rounds against overlap off: DP=2 and DP=3 EP over gloo on 127.0.0.1."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import DP_MAX_TOKENS, DP_PROMPTS, LONG, greedy, running, six_expert_checkpoint

from twinbatch import LLM
from twinbatch.config.model import ModelConfig
from twinbatch.distributed.all2all import Handle, make_all2all
from twinbatch.engine.launcher import free_port
from twinbatch.layers.forward_context import ForwardContext
from twinbatch.layers.moe import ExpertPlacement, Experts, MoE, expert_rounds

BACKENDS = ["allgather_reducescatter", "all2all", "all2allv"]


def sbo_llm(model: Path, backend: str, rounds: int, dp: int = 2, **kwargs: object) -> LLM:
    return LLM(str(model), max_model_len=128, data_parallel_size=dp, enable_expert_parallel=True,
               all2all_backend=backend, overlap="sbo", sbo_rounds=rounds, **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def one_process(dsv2_dir: Path) -> LLM:
    return LLM(str(dsv2_dir), max_model_len=128)


@pytest.mark.parametrize(
    ("backend", "rounds"),
    [("all2all", 1), *((b, r) for b in BACKENDS for r in (2, 4))],
)
def test_sbo_matches_one_process(dsv2_dir: Path, one_process: LLM, backend: str, rounds: int) -> None:
    """Uneven load (prompts of 2..30 tokens, 4..24 new tokens, chunked prefill beside decodes), then a run where
    rank 1 has no request at all. Four rounds over 4 local experts: with 2 experts a token, most rounds of a
    decode step carry no token to some expert, or to some rank."""
    llm = sbo_llm(dsv2_dir, backend, rounds, max_num_batched_tokens=24)
    try:
        for prompts, max_tokens in ((DP_PROMPTS, DP_MAX_TOKENS), (LONG[:1], [6])):
            assert greedy(llm, prompts, max_tokens) == greedy(one_process, prompts, max_tokens)
        assert list(llm.get_stats()["overlap"]) == [f"sbo{rounds}"]  # every step of every rank, as configured
    finally:
        llm.shutdown()


def test_sbo_over_three_ranks(dsv2_dir: Path, tmp_path: Path) -> None:
    model = six_expert_checkpoint(dsv2_dir, tmp_path)
    expected = greedy(LLM(str(model), load_format="dummy", max_model_len=128), DP_PROMPTS, DP_MAX_TOKENS)
    llm = sbo_llm(model, "all2all", 2, dp=3, load_format="dummy")
    try:
        assert greedy(llm, DP_PROMPTS, DP_MAX_TOKENS) == expected
    finally:
        llm.shutdown()


def test_expert_rounds_cover_every_expert_once() -> None:
    assert expert_rounds(4, 1) == ()
    assert expert_rounds(4, 4) == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert expert_rounds(7, 3) == ((0, 3), (3, 5), (5, 7))


@pytest.fixture
def group_of_one() -> Iterator[dist.ProcessGroup]:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@torch.inference_mode()  # as the engine runs its steps
def expert_calls(layer: MoE, x: torch.Tensor, rounds: int, monkeypatch: pytest.MonkeyPatch
                 ) -> tuple[torch.Tensor, list[range]]:  # fmt: skip
    """The layer's output, and the local experts each call of its Experts computed."""
    calls: list[range] = []
    forward = Experts.forward

    def counting(self: Experts, *args: torch.Tensor, group: tuple[int, int] | None = None) -> torch.Tensor:
        calls.append(range(*group) if group is not None else range(self.num_experts))
        return forward(self, *args, group)

    with monkeypatch.context() as m:
        m.setattr(Experts, "forward", counting)
        groups = expert_rounds(layer.experts.num_experts, rounds)
        out = layer(x, ForwardContext(None, x.shape[0], expert_groups=groups))  # MoE reads no attention metadata
    return out, calls


@pytest.mark.parametrize("backend", ["all2all", "allgather_reducescatter"])
@pytest.mark.parametrize("rounds", [2, 4])
def test_each_local_expert_computes_once_a_step(
    dsv2_dir: Path, group_of_one: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch, backend: str, rounds: int
) -> None:
    """One MoE layer over a group of one process: the expert GEMMs of the rounds cover every local expert exactly
    once (so its weights are read once), and the rounds' sum equals the layer without rounds."""
    cfg = ModelConfig.from_pretrained(dsv2_dir)
    torch.manual_seed(0)
    layer = MoE(cfg, ExpertPlacement(0, 1, make_all2all(backend, group_of_one, cfg.num_experts)))
    for p in layer.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(6, cfg.hidden_size)
    whole, calls = expert_calls(layer, x, 1, monkeypatch)
    assert calls == [range(cfg.num_experts)]
    got, calls = expert_calls(layer, x, rounds, monkeypatch)
    assert len(calls) == rounds and sorted(e for r in calls for e in r) == list(range(cfg.num_experts))
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)


def test_a_failing_wait_names_its_layer_and_round(
    dsv2_dir: Path, group_of_one: dist.ProcessGroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a round's wait for its collectives raises (as from a failed peer) names the layer and round."""
    cfg = ModelConfig.from_pretrained(dsv2_dir)
    layer = MoE(cfg, ExpertPlacement(0, 1, make_all2all("all2all", group_of_one, cfg.num_experts)), layer_idx=3)
    waits = 0
    wait = Handle.wait

    def third_wait_fails(handle: Handle) -> None:
        nonlocal waits
        waits += bool(handle.works)  # a wait with collectives in flight
        if waits == 3:  # rounds 0, 1, then 2 wait for their dispatches
            raise TimeoutError("no tokens from rank 1")
        wait(handle)

    monkeypatch.setattr(Handle, "wait", third_wait_fails)
    with pytest.raises(RuntimeError, match=r"^SBO round 2 of layer 3 failed: TimeoutError: no tokens from rank 1"):
        expert_calls(layer, torch.randn(6, cfg.hidden_size), 4, monkeypatch)


def test_sbo_rounds_are_checked(dsv2_dir: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the 4 routed experts"):
        sbo_llm(dsv2_dir, "all2all", 5)
    with pytest.raises(ValueError, match="enable-expert-parallel"):
        LLM(str(dsv2_dir), data_parallel_size=2, overlap="sbo")
    with pytest.raises(ValueError, match="choose one"):
        LLM(str(dsv2_dir), data_parallel_size=2, enable_expert_parallel=True, overlap="sbo", enable_dbo=True)


def test_injected_round_fault_ends_with_a_clear_error(dsv2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWINBATCH_SBO_FAULT", "2:1")  # decoder layer 2's MoE raises in round 1
    llm = sbo_llm(dsv2_dir, "all2all", 2)
    procs = llm.llm_engine.procs
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"SBO round 1 of layer 2"):
        greedy(llm, [DP_PROMPTS[0]] * 4, [4] * 4)
    assert time.monotonic() - start < 60
    assert not any(running(p.pid) for p in procs.values())
