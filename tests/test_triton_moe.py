"""The fused Triton experts (layers/triton_moe.py) against the reference experts, on CPU in Triton's interpreter:
expert and top-k counts, empty batches, other ranks' ids, experts without tokens, several K and N tiles, float32
and bf16, run-to-run determinism, the align step's layout, and a whole model on moe_backend="triton".

The kernels run in a worker process started with TRITON_INTERPRET=1 (conftest's `interpreter` fixture;
tests/test_triton_decode.py says why).
"""

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import DP_MAX_TOKENS, DP_PROMPTS, HF_PROMPTS, Interpreter, greedy, make_llm, run_recording, widen_bf16_dot

from twinbatch.layers.moe import Experts, forward_grouped, forward_reference

pytest.importorskip("triton")

HIDDEN, INTER = 48, 40  # not multiples of any tile: masked edges in K and N


def _fused(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Runs in the worker: triton_moe.fused_experts in the interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from twinbatch.layers import triton_moe

    widen_bf16_dot()
    tiles = kwargs.pop("tiles", None)
    return triton_moe.fused_experts(*args, tiles=tiles and triton_moe.Tiles(*tiles), **kwargs)


def make_case(num_experts: int, k: int, num_tokens: int, dtype: torch.dtype) -> tuple[Experts, tuple]:
    """Experts and (x, topk_weights, topk_ids): ids num_experts and num_experts + 1 belong to another rank, and
    expert 1 gets no token."""
    torch.manual_seed(num_experts * 100 + k * 10 + num_tokens)
    experts = Experts(num_experts, HIDDEN, INTER).to(dtype)
    for p in experts.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(num_tokens, HIDDEN).to(dtype)
    ids = torch.stack([torch.randperm(num_experts + 2)[:k] for _ in range(num_tokens)]) if num_tokens else None
    ids = torch.zeros(0, k, dtype=torch.int64) if ids is None else ids.masked_fill(ids == 1, num_experts + 1)
    return experts, (x, torch.rand(num_tokens, k), ids)


def run(interpreter: Interpreter, experts: Experts, inputs: tuple, **kwargs: Any) -> torch.Tensor:
    x, weights, ids = inputs
    return interpreter(_fused, x, experts.gate_up_proj.data, experts.down_proj.data, weights, ids, **kwargs)


def assert_matches_reference(out: torch.Tensor, experts: Experts, inputs: tuple) -> None:
    """Against the reference experts in float32 on the same (rounded) weights and inputs: float32 within 1e-5,
    bf16 within its rounding (2e-2, or 1% of larger values)."""
    x, weights, ids = inputs
    ref = copy.deepcopy(experts).float()
    expected = forward_reference(x.float(), weights, ids, ref.gate_up_proj, ref.down_proj)
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        return
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_experts", "k"), [(4, 2), (6, 3), (8, 6)])
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 37])
def test_matches_reference(interpreter: Interpreter, dtype: torch.dtype, num_experts: int, k: int,
                           num_tokens: int) -> None:  # fmt: skip
    experts, inputs = make_case(num_experts, k, num_tokens, dtype)
    out = run(interpreter, experts, inputs)
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == dtype
    assert_matches_reference(out, experts, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [(16, 16, 16, 4, 2), (32, 32, 16, 4, 2)])
def test_several_k_and_n_tiles(interpreter: Interpreter, dtype: torch.dtype, tiles: tuple) -> None:
    """Tiles smaller than H and I: the K loops and N grids run several steps, the last one masked."""
    experts, inputs = make_case(5, 4, 37, dtype)
    assert_matches_reference(run(interpreter, experts, inputs, tiles=tiles), experts, inputs)


def test_bit_identical_across_runs(interpreter: Interpreter) -> None:
    experts, inputs = make_case(8, 6, 37, torch.bfloat16)
    assert torch.equal(run(interpreter, experts, inputs), run(interpreter, experts, inputs))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("block_m", [4, 16])
def test_align_block_size_layout(block_m: int, compiled: bool) -> None:
    """Each expert's pairs in token order in its own run of rows, starting on a tile boundary and padded with
    num_pairs; each tile labelled with its expert; the tiles past the last run labelled num_experts. Compiled
    (as inside a compiled layer), the expert sort is the rank sort instead of argsort: the same layout."""
    from twinbatch.layers import triton_moe  # compiled mode here: the align step is torch only

    num_experts, k = 5, 3
    ids = torch.randint(-1, num_experts + 2, (23, k), generator=torch.Generator().manual_seed(block_m))
    ids[ids == 2] = 0  # expert 2 gets no pair; ids -1, 5 and 6 are skipped
    align = triton_moe.align_block_size
    if compiled:
        align = torch.compile(align, dynamic=True, fullgraph=True)
    rows, tile_expert = align(ids, num_experts, block_m)
    num_pairs, flat = ids.numel(), ids.flatten()
    assert rows.shape == (-(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m,)
    assert tile_expert.shape == (rows.shape[0] // block_m,)
    at = 0
    for expert in range(num_experts):
        pairs = (flat == expert).nonzero().flatten().tolist()
        padded = -(-len(pairs) // block_m) * block_m
        assert rows[at : at + len(pairs)].tolist() == pairs
        assert (rows[at + len(pairs) : at + padded] == num_pairs).all()
        assert (tile_expert[at // block_m : (at + padded) // block_m] == expert).all()
        at += padded
    assert (rows[at:] == num_pairs).all() and (tile_expert[at // block_m :] == num_experts).all()


def test_prefill_sized_bf16_batches_take_grouped_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the threshold, bfloat16 batches on the triton backend take torch._grouped_mm (faster there); here on
    CPU without the interpreter, where a Triton launch would raise. float32 ones stay on the kernels (test above)."""
    from twinbatch.layers import moe

    experts, (x, weights, ids) = make_case(8, 6, 37, torch.bfloat16)
    monkeypatch.setattr(moe, "RANK_SORT_MAX_PAIRS", ids.numel() - 1)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    experts.backend = "triton"
    out = experts(x, weights, ids)
    assert torch.equal(out, forward_grouped(x, weights, ids, experts.gate_up_proj, experts.down_proj))


def _whole_model(model_dir: Path) -> tuple[list, list, int]:
    """Runs in the worker: greedy tokens and logits rows of the model on moe_backend="triton", and how many
    calls went through the kernels."""
    from twinbatch.layers import triton_moe

    calls, fused = [], triton_moe.fused_experts
    triton_moe.fused_experts = lambda *args: calls.append(1) or fused(*args)
    try:
        tokens, logits, _ = run_recording(make_llm(model_dir, moe_backend="triton"), HF_PROMPTS[:2])
    finally:
        triton_moe.fused_experts = fused
    return tokens, logits, len(calls)


def test_whole_model_matches_reference_backend(interpreter: Interpreter, dsv2_dir: Path) -> None:
    """float32 DeepSeek-V2 (tiny): the same greedy tokens and logits rows as the reference experts."""
    tokens, logits, calls = interpreter(_whole_model, dsv2_dir)
    expected_tokens, expected_logits, _ = run_recording(make_llm(dsv2_dir, moe_backend="reference"), HF_PROMPTS[:2])
    assert calls, "no step went through the Triton experts"
    assert tokens == expected_tokens
    for ours, expected in zip(logits, expected_logits, strict=True):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def _compiled_serving(model_dir: Path) -> tuple[list, list, int, int]:
    """Runs in the worker: greedy tokens on the Triton experts uncompiled and compiled (Dynamo's eager backend,
    as tests/test_compilation.py uses on CPU), and the compiled graphs counted after the build and after
    serving."""
    from torch._dynamo.utils import counters

    from twinbatch import LLM, compilation

    compilation.BACKEND = "eager"
    torch._dynamo.reset()
    counters.clear()
    kwargs = {"moe_backend": "triton", "attention_backend": "batched", "max_model_len": 128}
    expected = greedy(LLM(str(model_dir), compilation_config="0", **kwargs), DP_PROMPTS, DP_MAX_TOKENS)
    llm = LLM(str(model_dir), compilation_config="3", **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    return expected, greedy(llm, DP_PROMPTS, DP_MAX_TOKENS), graphs, counters["stats"]["unique_graphs"]


def test_compiled_layers_on_triton_experts(interpreter: Interpreter, dsv2_dir: Path) -> None:
    """float32: the align step and the k-way sum compiled with the layer (the expert sort then a rank sort)
    give the uncompiled tokens, and serving batches of 5 down to 1 request compile nothing more than the build
    did (the align step's shapes are symbolic; its tile height is not a function of the batch)."""
    expected, tokens, built, served = interpreter(_compiled_serving, dsv2_dir)
    assert built > 0 and served == built, (built, served)
    assert tokens == expected


def test_triton_moe_refused_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from twinbatch import LLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="moe_backend='triton' runs its kernels on a CUDA GPU"):
        LLM(device="cpu", moe_backend="triton", max_model_len=64)
