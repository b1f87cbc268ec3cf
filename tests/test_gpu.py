"""The same engine on a CUDA GPU: run with `python -m pytest -m gpu` on a GPU host; skipped on CPU."""

from pathlib import Path

import pytest
import torch
from helpers import (
    DP_MAX_TOKENS,
    DP_PROMPTS,
    HF_PROMPTS,
    LONG,
    assert_close_in_low_precision,
    assert_close_until_a_tie,
    assert_matches_hf,
    greedy,
    run_recording,
)

from twinbatch import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module", params=["dsv2_dir", "dsv3_dir", "qwen3_dir"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def test_float32_on_gpu_matches_hf(model_dir: Path) -> None:
    llm = LLM(str(model_dir), device="cuda", dtype="float32", max_model_len=128)
    assert not torch.backends.cuda.matmul.allow_tf32  # float32 matmuls stay float32
    assert_matches_hf(model_dir, llm, HF_PROMPTS)


def test_bfloat16_on_gpu_close_to_hf(model_dir: Path) -> None:
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=128)
    assert_close_in_low_precision(model_dir, llm, max_rel_error=0.05)


def test_builtin_model_generates_on_gpu() -> None:
    llm = LLM(device="cuda")  # bf16 by default on GPU
    assert llm.llm_engine.config.dtype == torch.bfloat16
    outs = llm.generate(["Hello, my name is", "The capital of France is"], SamplingParams(max_tokens=16, seed=1))
    assert all(len(o.outputs[0].token_ids) == 16 or o.outputs[0].finish_reason == "stop" for o in outs)


def test_deepseek_v2_lite_shapes_on_gpu() -> None:
    """The DeepSeek-V2-Lite preset (real shapes, dummy weights, bf16): a batch of mixed lengths runs with
    chunked prefill, and greedy decoding is reproducible."""
    llm = LLM("deepseek-ai/DeepSeek-V2-Lite", device="cuda", max_model_len=2048, max_num_batched_tokens=512)
    prompts = [[(i * 7 + j) % 100000 for j in range(n)] for i, n in enumerate((5, 300, 700, 64))]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert all(len(t) == 8 for t in first)
    assert first == again


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("backend", ["allgather_reducescatter", "all2all", "all2allv"])
def test_dp2_ep2_on_two_gpus_matches_one_gpu(dsv2_dir: Path, backend: str) -> None:
    """NCCL for the expert all-to-alls, gloo for the per-step DP sync; float32 so the tokens must agree."""
    kwargs = {"device": "cuda", "dtype": "float32", "max_model_len": 128}
    expected = greedy(LLM(str(dsv2_dir), **kwargs), DP_PROMPTS, DP_MAX_TOKENS)
    llm = LLM(str(dsv2_dir), data_parallel_size=2, enable_expert_parallel=True, all2all_backend=backend, **kwargs)
    try:
        assert greedy(llm, DP_PROMPTS, DP_MAX_TOKENS) == expected
    finally:
        llm.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("backend", ["allgather_reducescatter", "all2all", "all2allv"])
def test_dbo_on_two_gpus_matches_dbo_off(dsv2_dir: Path, backend: str) -> None:
    kwargs = {"device": "cuda", "dtype": "float32", "max_model_len": 128, "all2all_backend": backend}
    stats = dbo_matches_dbo_off(dsv2_dir, kwargs, kwargs)
    assert stats["dbo"].get("microbatched", 0) > 0


def dbo_matches_dbo_off(dsv2_dir: Path, off_kwargs: dict, on_kwargs: dict) -> dict:
    """DP=2 EP=2 greedy tokens of an even load (so decode steps microbatch) with DBO off, then on; they must agree.
    Returns the DBO engine's stats."""
    prompts, max_tokens = LONG * 2, [8] * 8
    dp = {"data_parallel_size": 2, "enable_expert_parallel": True}
    dbo = {"enable_dbo": True, "dbo_decode_token_threshold": 2, "dbo_prefill_token_threshold": 2}
    off = LLM(str(dsv2_dir), **dp, **off_kwargs)
    try:
        expected = greedy(off, prompts, max_tokens)
    finally:
        off.shutdown()
    on = LLM(str(dsv2_dir), **dp, **dbo, **on_kwargs)
    try:
        assert greedy(on, prompts, max_tokens) == expected
        return on.get_stats()
    finally:
        on.shutdown()


@pytest.mark.parametrize("model_fixture", ["dsv2_dir", "qwen3_dir"])
def test_cuda_graphs_match_eager(model_fixture: str, request: pytest.FixtureRequest) -> None:
    """Decode steps replay as CUDA graphs by default (bfloat16 on GPU): the same logits and tokens as eager."""
    model_dir = request.getfixturevalue(model_fixture)
    results = []
    for eager in (True, False):
        llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", max_model_len=128, enforce_eager=eager)
        assert (llm.llm_engine.model_runner.graphs is None) == eager
        results.append(run_recording(llm, HF_PROMPTS))
        kinds = {key[0] for key in llm.llm_engine.model_runner.graphs.graphs} if not eager else set()
        assert eager or kinds == {"decode", "prefill"}  # captured and replayed
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


def test_graphs_are_captured_at_start_up_and_a_step_without_one_runs_eagerly(dsv2_dir: Path) -> None:
    """The engine captures its graphs before serving: decode graphs of batch buckets 1, 2, 4, 8 at the context
    bucket 64, prefill graphs of token buckets 16, 32, 64 at 1, 4 and 8 request rows. Serving captures nothing
    more; a step whose graph was dropped runs eagerly, with the tokens of an engine without graphs."""
    kwargs = {"device": "cuda", "dtype": "bfloat16", "max_model_len": 64, "max_num_seqs": 8,
              "max_num_batched_tokens": 64}  # fmt: skip
    llm = LLM(str(dsv2_dir), **kwargs)
    decode = {("decode", b, 64, "off") for b in (1, 2, 4, 8)}
    prefill = {("prefill", t, r, "off") for t in (16, 32, 64) for r in (1, 4, 8)}
    stats = llm.get_stats()
    assert set(stats["cuda_graphs"]) == decode | prefill
    assert stats["cuda_graph_capture"]["graphs"] == len(decode | prefill)
    assert stats["cuda_graph_capture"]["seconds"] > 0 and stats["cuda_graph_capture"]["memory_bytes"] > 0
    graphs = llm.llm_engine.model_runner.graphs.graphs
    del graphs[("decode", 4, 64, "off")]  # steps of 3 or 4 decodes now run eagerly
    prompts = [list(range(3 + i, 9 + 2 * i)) for i in range(4)]
    tokens = greedy(llm, prompts, [6] * 4)
    assert set(graphs) == (decode | prefill) - {("decode", 4, 64, "off")}  # nothing captured while serving
    assert tokens == greedy(LLM(str(dsv2_dir), enforce_eager=True, **kwargs), prompts, [6] * 4)


def test_async_scheduling_on_gpu_matches_synchronous(dsv2_dir: Path) -> None:
    """With CUDA graphs: the sampled tokens reach the next step's inputs on the device, and the outputs equal
    synchronous scheduling's, logprobs included."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    prompts = [p[:40] for p in LONG] + HF_PROMPTS
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(str(dsv2_dir), device="cuda", dtype="float32", max_model_len=64, max_num_batched_tokens=32,
                  async_scheduling=async_scheduling)  # fmt: skip
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs])
    assert runs[1] == runs[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_graphs_with_dp2_ep2(dsv2_dir: Path) -> None:
    kwargs = {"device": "cuda", "dtype": "bfloat16", "max_model_len": 128, "data_parallel_size": 2,
              "enable_expert_parallel": True, "all2all_backend": "all2all"}  # fmt: skip
    results = []
    for eager in (True, False):
        llm = LLM(str(dsv2_dir), enforce_eager=eager, **kwargs)
        try:
            results.append(greedy(llm, DP_PROMPTS, DP_MAX_TOKENS))
        finally:
            llm.shutdown()
    assert results[0] == results[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("backend", ["allgather_reducescatter", "all2all"])
def test_dbo_cuda_graphs_match_eager(dsv2_dir: Path, backend: str) -> None:
    """Microbatched decode steps captured whole (threads during capture, one graph on replay) give exactly the
    tokens of eager microbatched steps. Graphs need bfloat16 (grouped GEMM); with DBO off the matrices have other
    shapes, whose bfloat16 rounding may flip a greedy tie, so DBO on vs off is checked in float32 eagerly
    (test_dbo_on_two_gpus_matches_dbo_off): graph == eager DBO == eager DBO off."""
    prompts, max_tokens = LONG * 2, [8] * 8  # an even load, so decode steps microbatch
    dbo = {"enable_dbo": True, "dbo_decode_token_threshold": 2, "dbo_prefill_token_threshold": 2}
    kwargs = {"device": "cuda", "dtype": "bfloat16", "max_model_len": 128, "data_parallel_size": 2,
              "enable_expert_parallel": True, "all2all_backend": backend, **dbo}  # fmt: skip
    eager = LLM(str(dsv2_dir), enforce_eager=True, **kwargs)
    try:
        expected = greedy(eager, prompts, max_tokens)
    finally:
        eager.shutdown()
    graphs = LLM(str(dsv2_dir), **kwargs)
    try:
        assert greedy(graphs, prompts, max_tokens) == expected
        for stats in graphs.get_stats()["ranks"].values():
            assert stats["dbo"].get("microbatched", 0) > 0
            assert any(key[-1] == "dbo" for key in stats["cuda_graphs"])  # microbatched
            assert any(key[0] == "prefill" for key in stats["cuda_graphs"])
    finally:
        graphs.shutdown()


def _recapture_rank(rank: int, config: object, phase: str, results: object) -> None:
    import dataclasses

    from twinbatch.bench.step import _plan, synthetic_batch
    from twinbatch.core.step_plan import GraphStep, OverlapMode
    from twinbatch.distributed.parallel_state import destroy_distributed, init_distributed
    from twinbatch.engine.worker_main import worker_device
    from twinbatch.worker.model_runner import ModelRunner

    parallel = dataclasses.replace(config.parallel, data_parallel_rank=rank)
    config = dataclasses.replace(config, parallel=parallel, device=worker_device(config, rank))
    state = init_distributed(config.parallel, config.device)
    runner = ModelRunner(config, state)
    batch = synthetic_batch(config, 8, phase, 40)
    plan = _plan(runner, batch, OverlapMode.DBO)
    assert plan.graph == (GraphStep(8) if phase == "decode" else GraphStep(16, prefill=True, context=16))
    allocated = []
    for _ in range(4):
        runner.graphs.clear()
        runner.execute_model(plan)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated(config.device))
    assert len(runner.graphs.graphs) == 1
    results.put((rank, allocated))
    runner.graphs.clear()
    destroy_distributed()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_dbo_graph_recapture_does_not_leak_memory(phase: str) -> None:
    import torch.multiprocessing as mp

    from twinbatch.engine.arg_utils import EngineArgs
    from twinbatch.engine.launcher import free_port

    config = EngineArgs(
        device="cuda", dtype="bfloat16", load_format="dummy", data_parallel_size=2, enable_expert_parallel=True,
        enable_dbo=True, all2all_backend="all2all", max_model_len=64, max_num_seqs=8, num_gpu_blocks_override=64,
        master_port=free_port(),
    ).create_engine_config()  # fmt: skip
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_recapture_rank, args=(config, phase, results), nprocs=2, start_method="spawn")
    for _ in range(2):
        rank, allocated = results.get()
        assert allocated[1:] == allocated[:1] * 3, f"rank {rank}: memory after each re-capture {allocated}"


@pytest.mark.parametrize(("model_fixture", "dtype"), [("dsv2_dir", "bfloat16"), ("qwen3_dir", "bfloat16"),
                                                      ("dsv2_dir", "float32"), ("qwen3_dir", "float32")])  # fmt: skip
def test_compiled_layers_match_uncompiled(model_fixture: str, dtype: str, request: pytest.FixtureRequest) -> None:
    """Layers under torch.compile (Inductor, the default on GPU; prefill and decode, decode inside CUDA graphs)
    against -O0. float32 (Triton experts; grouped GEMM needs bf16): the same tokens, logits within 1e-4. bf16:
    Inductor keeps intermediates in float32, so the runs round differently; they are held to the bf16 HF-parity
    standard (test_hf_parity), measured against each other up to where the greedy tokens part (see
    assert_close_until_a_tie)."""
    model_dir = request.getfixturevalue(model_fixture)
    kwargs = {"device": "cuda", "dtype": dtype, "max_model_len": 128}
    if dtype == "float32":
        kwargs["moe_backend"] = "triton"
    results = []
    for level in ("0", "3"):
        llm = LLM(str(model_dir), compilation_config=level, **kwargs)
        runner = llm.llm_engine.model_runner
        assert (runner.model.model.compiled_layer is None) == (level == "0")
        results.append(run_recording(llm, HF_PROMPTS))
        assert runner.graphs.graphs
    if dtype == "float32":
        assert results[0][0] == results[1][0]
        for logits, compiled_logits in zip(results[0][1], results[1][1], strict=True):
            torch.testing.assert_close(logits, compiled_logits, atol=1e-4, rtol=0)
    else:
        assert_close_until_a_tie(*results[0][:2], *results[1][:2])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_compiled_dbo_graphs_match_uncompiled_eager_dbo_off(dsv2_dir: Path) -> None:
    """The whole fast path (compiled layers, DBO microbatches captured in one CUDA graph) against the plainest
    GPU run (no compile, no graphs, DBO off), in float32 (Triton experts) so the tokens must agree."""
    kwargs = {"device": "cuda", "dtype": "float32", "max_model_len": 128, "all2all_backend": "all2all",
              "moe_backend": "triton"}  # fmt: skip
    stats = dbo_matches_dbo_off(dsv2_dir, {"enforce_eager": True, "compilation_config": "0", **kwargs}, kwargs)
    for rank in stats["ranks"].values():
        assert rank["dbo"].get("microbatched", 0) > 0
        assert any(key[-1] == "dbo" for key in rank["cuda_graphs"])  # microbatched


@pytest.mark.parametrize("backend", ["all2all", "allgather_reducescatter"])
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_sbo_graphs_match_eager_on_one_gpu(dsv2_dir: Path, backend: str, phase: str) -> None:
    """Expert parallelism over a world of one (the all-to-alls are local copies through NCCL): an SBO step in 2
    and 4 rounds replayed from its CUDA graph gives the eager SBO step's logits, and those of the step without
    rounds up to the order of the rounds' additions."""
    import dataclasses

    from twinbatch.bench.step import _plan, synthetic_batch
    from twinbatch.core.step_plan import OverlapMode
    from twinbatch.distributed.parallel_state import destroy_distributed, init_distributed
    from twinbatch.engine.arg_utils import EngineArgs
    from twinbatch.engine.launcher import free_port
    from twinbatch.worker.model_runner import ModelRunner

    args = EngineArgs(
        model=str(dsv2_dir),
        enable_expert_parallel=True,
        all2all_backend=backend,
        max_model_len=64,
        max_num_seqs=8,
        num_gpu_blocks_override=64,
        max_num_batched_tokens=16,
        master_port=free_port(),
    )
    config = args.create_engine_config()
    config = dataclasses.replace(config, device=torch.device("cuda", 0))  # NCCL wants the device's index
    state = init_distributed(config.parallel, config.device)
    try:
        runner = ModelRunner(config, state)
        batch = synthetic_batch(config, 8, phase, 40)
        off = runner.execute_model(_plan(runner, batch, OverlapMode.OFF, graph=False)).logits
        for rounds in (2, 4):
            graphed = _plan(runner, batch, OverlapMode.SBO, rounds=rounds)
            assert graphed.graph is not None and graphed.label == f"sbo{rounds}"
            eager = runner.execute_model(_plan(runner, batch, OverlapMode.SBO, graph=False, rounds=rounds)).logits
            replayed = runner.execute_model(graphed).logits
            torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(eager, off, atol=1e-4, rtol=1e-4)
        assert {key[-1] for key in runner.graphs.graphs} == {"sbo2", "sbo4"}
        runner.shutdown()
    finally:
        destroy_distributed()
