"""torch.compile of decode layers (`-O`): the level flag, and compiled decode giving the tokens of uncompiled
decode, alone and under DBO with the expert all-to-all (gloo, 2 processes). On CPU the compiled graphs run on
Dynamo's "eager" backend: the same tracing, graph breaks and guards as on GPU, without Inductor's code
generation; Inductor itself is exercised by the `gpu` tests."""

import argparse
from pathlib import Path

import pytest
import torch
from helpers import DP_MAX_TOKENS, DP_PROMPTS, LONG, greedy
from torch._dynamo.utils import counters

from twinbatch import LLM, SamplingParams, compilation
from twinbatch.engine.arg_utils import EngineArgs

FAST = {"attention_backend": "batched", "moe_backend": "grouped_mm", "dtype": "bfloat16", "max_model_len": 128}


@pytest.mark.parametrize(
    ("argv", "level"),
    [([], 0), (["-O3"], 3), (["-O", "0"], 0), (["--compilation-config", "2"], 2),
     (["--compilation-config", '{"level": 0}'], 0), (["-O", '{"mode": 3}'], 3)],
)  # fmt: skip
def test_compilation_level_flags(argv: list[str], level: int) -> None:
    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    config = EngineArgs.from_cli_args(parser.parse_args(argv)).create_engine_config()
    assert config.compilation_level == level  # default on CPU: 0


@pytest.mark.parametrize("value", ["4", "-1", "fast", '{"level": "3"}', "true", '{"backend": "eager"}'])
def test_bad_compilation_level_says_what_to_give(value: str) -> None:
    with pytest.raises(ValueError, match=r"level 0-3 .*-O0"):
        EngineArgs(compilation_config=value).create_engine_config()


@pytest.fixture
def eager_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compilation, "BACKEND", "eager")
    monkeypatch.setenv("TWINBATCH_COMPILE_BACKEND", "eager")  # for spawned DP ranks
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("model_fixture", ["dsv2_dir", "qwen3_dir"])
@pytest.mark.usefixtures("eager_backend")
def test_compiled_decode_gives_the_uncompiled_tokens(model_fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    expected = greedy(LLM(str(model_dir), compilation_config="0", **FAST), DP_PROMPTS, DP_MAX_TOKENS)
    llm = LLM(str(model_dir), compilation_config="3", **FAST)
    assert llm.llm_engine.model_runner.model.model.compiled_layer is not None
    graphs = counters["stats"]["unique_graphs"]
    # compiled when the engine was built; one layer function for every layer: a few graphs per layer kind and
    # step kind (decode or prefill), compiled at build (each model has 2 layer kinds and 3 layers here,
    # V2-Lite 27)
    assert 0 < graphs <= 20, f"{graphs} compiled graphs"
    assert greedy(llm, DP_PROMPTS, DP_MAX_TOKENS) == expected  # decode batches of 5 down to 1 request
    assert counters["stats"]["unique_graphs"] == graphs, "serving compiled again"


@pytest.mark.usefixtures("eager_backend")
@pytest.mark.parametrize("overlap", [{"enable_dbo": True}, {"overlap": "sbo", "sbo_rounds": 2}])
def test_compiled_decode_under_overlap_gives_the_uncompiled_tokens(dsv2_dir: Path, overlap: dict) -> None:
    """Collectives, waits and the microbatch yields stay outside the compiled graphs, so the microbatch threads
    still take turns at every all-to-all. Compiling on CPU needs bfloat16 (the grouped GEMM's meta function takes
    no float32), and a DP engine's batches depend on when each rank sees the requests: a bfloat16 greedy choice
    between two near-equal tokens may then go either way, in either build. So the outputs must be equal up to
    the first difference, with their logprobs close, and there the two best tokens must be a near-tie. Near:
    0.15, a few bfloat16 steps of a logit (1/32 to 1/16 at magnitudes 4 to 8) after several decode steps on
    batches of another make-up; at 0.05 the test failed 2 runs of 12 on an idle 2-core machine, with gaps of
    0.09. A broken turn-taking of the microbatches gives other tokens without any tie. The same holds for SBO's
    rounds (a compiled layer issues every round's collectives outside its graphs, as uncompiled)."""
    kwargs = {"data_parallel_size": 2, "enable_expert_parallel": True, "all2all_backend": "all2all",
              "dbo_decode_token_threshold": 2, "dbo_prefill_token_threshold": 2, **overlap, **FAST}  # fmt: skip
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)] * 8
    results = []
    for level in ("0", "3"):
        llm = LLM(str(dsv2_dir), compilation_config=level, **kwargs)
        try:
            results.append([o.outputs[0] for o in llm.generate(LONG * 2, params, use_tqdm=False)])  # even load:
            ran = "dbo" if "enable_dbo" in overlap else "sbo2"
            assert all(ran in s["overlap"] for s in llm.get_stats()["ranks"].values())  # the overlap ran
        finally:
            llm.shutdown()
    near = 0.15
    for eager, compiled in zip(*results, strict=True):
        pairs = list(zip(eager.token_ids, compiled.token_ids, strict=True))
        i = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        for j, token in enumerate(eager.token_ids[:i]):
            assert abs(eager.logprobs[j][token].logprob - compiled.logprobs[j][token].logprob) < near, j
        if i < len(pairs):
            top = sorted((lp.logprob for lp in eager.logprobs[i].values()), reverse=True)
            assert top[0] - top[1] < near, f"token {i} differs without a near-tie: {eager.logprobs[i]}"


@pytest.mark.usefixtures("eager_backend")
def test_a_compile_failure_says_how_to_turn_compilation_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_backend(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        raise ValueError("no code generator here")

    monkeypatch.setattr(compilation, "BACKEND", failing_backend)
    with pytest.raises(RuntimeError, match=r"torch.compile failed on a decoder layer .*-O0"):
        LLM(compilation_config="3", **FAST)  # the layers compile when the engine is built


@pytest.mark.parametrize("compiled", [False, True])
def test_expert_sort_is_a_stable_argsort(compiled: bool) -> None:
    """Eager: a radix sort; compiled: a rank sort (equal ids before each pair). Both must give the stable order of
    the ids (other ranks' experts, ids >= num_experts, last) and each expert's end row."""
    from twinbatch.ops import count_ids, sort_by_expert

    sort = torch.compile(sort_by_expert, backend="eager", dynamic=True) if compiled else sort_by_expert
    gen = torch.Generator().manual_seed(0)
    for pairs, experts in [(1, 1), (7, 3), (96, 8), (300, 32), (1536, 32), (3072, 32)]:
        ids = torch.randint(0, experts + 3, (pairs,), generator=gen)
        order, offs = sort(ids, experts)
        assert torch.equal(order, ids.clamp(max=experts).argsort(stable=True))
        assert torch.equal(offs, count_ids(ids, experts).cumsum(0).to(torch.int32))


@pytest.mark.parametrize("backend", ["all2all", "allgather_reducescatter"])
@pytest.mark.usefixtures("eager_backend")
def test_compiled_exchange_compiles_once(backend: str) -> None:
    """A compiled layer breaks its graph at every collective. With `works.append(collective(...))`, torch 2.11
    on Python 3.12 resumed with the bound `append` on its stack and guarded on it: a new object each call, so
    every call compiled again (until Dynamo gave up on the frame after 64). One process, gloo, a group of one."""
    import torch.distributed as dist

    from twinbatch.distributed.all2all import make_all2all
    from twinbatch.engine.launcher import free_port
    from twinbatch.layers.forward_context import ForwardContext

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        exchange = make_all2all(backend, dist.group.WORLD, num_experts=4)

        def moe(x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
            ids = torch.ones(x.shape[0], 2, dtype=torch.long)  # both choices: expert 1, on this rank
            handle = exchange.dispatch_launch(x, torch.ones(x.shape[0], 2), ids, ctx.max_tokens_across_dp)
            recv = exchange.dispatch_wait(handle)
            exchange.combine_launch(recv.x * 2, handle)
            return exchange.combine_wait(handle)

        compiled = torch.compile(moe, backend="eager", dynamic=True)
        for step in range(6):
            x = torch.randn(5, 8)
            assert torch.equal(compiled(x, ForwardContext(None, 5)), 2 * x)
            if step == 1:
                frames = counters["frames"]["total"]
        assert counters["frames"]["total"] == frames, "compiled again on later calls"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("request_len", "starts", "seq_lens"),
                         [(0, [0], []), (1, [0, 1, 2, 3, 4, 5], [1] * 5), (2, [0, 2, 4, 5], [2, 2, 1])])  # fmt: skip
def test_padding_tokens_form_requests_only_when_asked(
    dsv2_dir: Path, request_len: int, starts: list[int], seq_lens: list[int]
) -> None:
    """Five padding tokens: of no request (a microbatched step padded to the largest rank), one-token requests
    (decode graphs), or two-token requests, the last one shorter (the compile warm-up's prefill steps)."""
    from twinbatch.core.scheduler import SchedulerOutput

    runner = LLM(str(dsv2_dir), max_model_len=128).llm_engine.model_runner
    attn = runner.prepare_inputs(SchedulerOutput(), num_padded_tokens=5, pad_requests=request_len).attn
    assert attn.num_tokens == 5 and attn.slot_mapping.tolist() == [0] * 5  # every one writes the reserved slot
    assert attn.query_start_loc.tolist() == starts and attn.seq_lens.tolist() == seq_lens
