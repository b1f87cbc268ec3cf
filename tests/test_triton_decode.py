"""The Triton paged decode kernel (layers/triton_decode.py) against the reference attention, on CPU in Triton's
interpreter: MLA and GQA shapes, block sizes, ragged and padding requests, scattered block tables, NaN in
unwritten cache memory, split-K; and both models wired to it, against HF.

Triton reads TRITON_INTERPRET when it is imported (its own library functions are jitted then), so the kernels
run in one worker process started with it set; this process (and a GPU run of the suite) keeps compiled Triton.
"""

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import HF_PROMPTS, Interpreter, assert_matches_hf, make_cache, make_llm, reference, widen_bf16_dot

pytest.importorskip("triton")


def _kernel(name: str, *args: Any, **kwargs: Any) -> Any:
    """Runs in the worker: triton_decode.<name>(*args, **kwargs) in the interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from twinbatch.layers import triton_decode

    widen_bf16_dot()
    return getattr(triton_decode, name)(*args, **kwargs)


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

    from twinbatch.layers import triton_decode

    calls, launch = [], triton_decode._launch
    triton_decode._launch = lambda *args: calls.append(1) or launch(*args)
    try:
        for make in (make_deepseek_v2, make_qwen3_moe):
            model_dir = make(tmp_path / make.__name__)
            for chunked in ({}, {"max_num_batched_tokens": 8}):
                llm = make_llm(model_dir, attention_backend="triton", block_size=4, **chunked)
                assert_matches_hf(model_dir, llm, HF_PROMPTS[:2])
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
