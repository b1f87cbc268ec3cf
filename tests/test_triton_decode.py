"""The Triton paged decode kernel (layers/triton_decode.py) against the reference attention, on CPU in Triton's
interpreter: MLA and GQA shapes, block sizes, ragged and padding requests, scattered block tables, NaN in
unwritten cache memory, split-K; and both models wired to it, against HF.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are jitted then), so the kernels
run in one worker process started with it set; this process (and a GPU run of the suite) keeps compiled Triton.
"""

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from twinbatch.layers.attention import AttentionMetadata, paged_attention_reference

pytest.importorskip("triton")

Interpreter = Callable[..., Any]


def _widen_bf16_dot() -> None:
    """Triton 3.8's interpreter multiplies bfloat16 operands as their raw uint16 storage; widen them to float32
    first (exact, as the GPU's bf16 MMA with fp32 accumulation is)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    dot = InterpreterBuilder.create_dot
    if getattr(dot, "widens_bf16", False):
        return

    def widen(x: TensorHandle) -> TensorHandle:
        if x.dtype.scalar != tl.bfloat16:
            return x
        return TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self: InterpreterBuilder, a: TensorHandle, b: TensorHandle, *rest: Any) -> TensorHandle:
        return dot(self, widen(a), widen(b), *rest)

    create_dot.widens_bf16 = True  # type: ignore[attr-defined]
    InterpreterBuilder.create_dot = create_dot


def _kernel(name: str, *args: Any, **kwargs: Any) -> Any:
    """Runs in the worker: triton_decode.<name>(*args, **kwargs) in the interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from twinbatch.layers import triton_decode

    _widen_bf16_dot()
    return getattr(triton_decode, name)(*args, **kwargs)


@pytest.fixture(scope="module")
def interpreter() -> Iterator[Interpreter]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # for the worker, which inherits it at its start
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os.getpid).result()
    with pool:
        yield lambda fn, *args, **kwargs: pool.submit(fn, *args, **kwargs).result(timeout=300)


def make_cache(
    entry: tuple[int, ...],
    block_size: int,
    seq_lens: list[int],
    num_padding: int,
    dtype: torch.dtype,
    max_seq_len: int | None = None,
    device: str = "cpu",
) -> tuple[torch.Tensor, AttentionMetadata]:
    """A NaN-filled cache with each request's entries in shuffled, non-contiguous blocks, followed by num_padding
    CUDA-graph padding requests (one token, block 0). max_seq_len: the host bound (a graph's context bucket)."""
    torch.manual_seed(len(seq_lens) * 1000 + block_size)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = 2 * sum(need) + 2
    cache = torch.full((num_blocks, block_size, *entry), float("nan"), dtype=dtype, device=device)
    cache[0, 0] = torch.randn(entry)  # padding tokens write slot 0 before attention reads it
    free = torch.randperm(num_blocks - 1, dtype=torch.int32) + 1
    table = torch.zeros(len(seq_lens) + num_padding, max(need) + 3, dtype=torch.int32)
    for i, (n, s) in enumerate(zip(need, seq_lens, strict=True)):
        table[i, :n], free = free[:n], free[n:]
        slots = (table[i, :n, None] * block_size + torch.arange(block_size)).flatten()[:s]
        cache.view(-1, *entry)[slots.to(device)] = torch.randn(s, *entry, dtype=dtype, device=device)
    lens = torch.tensor(seq_lens + [1] * num_padding, dtype=torch.int32)
    meta = AttentionMetadata(
        query_start_loc=torch.arange(lens.shape[0] + 1, dtype=torch.int32, device=device), seq_lens=lens.to(device),
        block_tables=table.to(device), slot_mapping=torch.zeros(lens.shape[0], dtype=torch.int64, device=device),
        block_size=block_size, decode_only=True, max_seq_len=max_seq_len or max(seq_lens),
    )  # fmt: skip
    return cache, meta


def reference(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float, v_dim: int, mla: bool):
    """The per-request SDPA oracle in float32. MLA: one kv head whose key is the whole entry, value its latent."""

    def expand(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (e[:, None, :], e[:, None, :v_dim]) if mla else e.unbind(1)

    return paged_attention_reference(q.float(), cache.float(), meta, expand, scale, v_dim)


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
RAGGED = [1, 5, 37, 70, 16, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("latent", "rope", "heads"), [(64, 16, 16), (32, 8, 4)])
@pytest.mark.parametrize(("block_size", "num_splits"), [(4, None), (8, 3), (16, 7)])
def test_mla_matches_reference(interpreter: Interpreter, dtype: torch.dtype, latent: int, rope: int, heads: int,
                               block_size: int, num_splits: int | None) -> None:  # fmt: skip
    cache, meta = make_cache((latent + rope,), block_size, RAGGED, num_padding=2, dtype=dtype, max_seq_len=96)
    q = torch.randn(meta.num_reqs, heads, latent + rope).to(dtype)
    q_latent, q_pe = q.split([latent, rope], dim=-1)
    out = interpreter(_kernel, "mla_decode", q_latent.contiguous(), q_pe, cache, meta, 0.3, num_splits=num_splits)
    expected = reference(q, cache, meta, 0.3, latent, mla=True)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(8, 2, 16), (4, 4, 24), (6, 1, 32)])
@pytest.mark.parametrize(("block_size", "num_splits"), [(4, 2), (16, None)])
def test_gqa_matches_reference(interpreter: Interpreter, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int,
                               block_size: int, num_splits: int | None) -> None:  # fmt: skip
    cache, meta = make_cache((2, kv_heads, head_dim), block_size, RAGGED, num_padding=1, dtype=dtype)
    q = torch.randn(meta.num_reqs, heads, head_dim).to(dtype)
    out = interpreter(_kernel, "gqa_decode", q, cache, meta, head_dim**-0.5, num_splits=num_splits)
    expected = reference(q, cache, meta, head_dim**-0.5, head_dim, mla=False)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=0)


def test_real_mla_dims_write_into_a_preallocated_view(interpreter: Interpreter) -> None:
    """DeepSeek-V2-Lite's 16 heads x (512 + 64), split over the context, written into rows of a larger buffer
    (the model's padded output): the rows past the requests stay untouched."""
    cache, meta = make_cache((576,), 16, [300, 1, 129], num_padding=1, dtype=torch.float32)
    q = torch.randn(meta.num_reqs, 16, 576)
    buffer = torch.full((meta.num_reqs + 2, 16, 512), 7.0)
    out = interpreter(
        _kernel, "mla_decode", q[..., :512].contiguous(), q[..., 512:], cache, meta, 0.1, out=buffer[: meta.num_reqs]
    )
    assert out.data_ptr() == buffer.data_ptr() and (buffer[meta.num_reqs :] == 7).all()
    torch.testing.assert_close(out, reference(q, cache, meta, 0.1, 512, mla=True), atol=1e-4, rtol=0)


def test_split_count_fills_the_gpu_without_tiny_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    from twinbatch.layers import triton_decode  # compiled mode here: only the host-side split choice is tested

    monkeypatch.setattr(triton_decode, "_num_sms", lambda device: 132)  # an H100
    splits = lambda max_seq_len, programs: triton_decode.num_splits_for(max_seq_len, programs, torch.device("cuda"))  # noqa: E731
    assert splits(4096, 256) == splits(4096, 132) == 1  # the requests alone fill every SM
    assert splits(4096, 64) == 9  # about four programs per SM
    assert splits(4096, 4) == 4096 // triton_decode.MIN_SPLIT_LEN
    assert splits(1 << 20, 1) == triton_decode.MAX_SPLITS
    assert splits(200, 1) == 1
    assert triton_decode.num_splits_for(4096, 4, torch.device("cuda"), d_k=576) == 1  # MLA: never split (measured)


def _whole_model(tmp_path: Path) -> None:
    """Runs in the worker: each model with attention_backend="triton" (float32) matches HF, and its decode steps
    went through the kernel; also with chunked prefill (an 8-token budget), whose mixed steps send their
    decodes to the kernel."""
    from hf_oracle import make_deepseek_v2, make_qwen3_moe
    from test_hf_parity import PROMPTS, assert_matches_hf, make_llm

    from twinbatch.layers import triton_decode

    calls, launch = [], triton_decode._launch
    triton_decode._launch = lambda *args: calls.append(1) or launch(*args)
    try:
        for make in (make_deepseek_v2, make_qwen3_moe):
            model_dir = make(tmp_path / make.__name__)
            for chunked in ({}, {"max_num_batched_tokens": 8}):
                llm = make_llm(model_dir, attention_backend="triton", block_size=4, **chunked)
                assert_matches_hf(model_dir, llm, PROMPTS[:2])
                assert calls, f"no decode step of {make.__name__} went through the Triton kernel ({chunked})"
                calls.clear()
    finally:
        triton_decode._launch = launch


def test_whole_model_with_triton_backend_matches_hf(interpreter: Interpreter, tmp_path: Path) -> None:
    interpreter(_whole_model, tmp_path)


def test_triton_backend_refused_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from twinbatch import LLM

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="attention_backend='triton' runs its kernels on a CUDA GPU"):
        LLM(device="cpu", attention_backend="triton", max_model_len=64)
