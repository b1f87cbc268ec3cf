"""Shared fixtures: tiny Hugging Face checkpoints (built once per session), the built-in model, and a worker
process that runs Triton kernels in its interpreter.

tests/ has no __init__.py, so pytest puts it on sys.path and `hf_oracle` and `helpers` import as top-level modules.
"""

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from helpers import Interpreter
from hf_oracle import make_deepseek_v2, make_deepseek_v3, make_qwen3_moe

from twinbatch import LLM


@pytest.fixture(scope="session")
def dsv2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_deepseek_v2(tmp_path_factory.mktemp("dsv2"))


@pytest.fixture(scope="session")
def dsv3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_deepseek_v3(tmp_path_factory.mktemp("dsv3"))


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen3_moe(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="session")
def builtin_llm() -> LLM:
    """The built-in tiny DeepSeek-V2 (random weights, real tokenizer). Shared: tests must leave it idle."""
    return LLM(max_model_len=256, seed=0)


@pytest.fixture(scope="session")
def builtin_server() -> Iterator[str]:
    """`twinbatch serve` on the built-in model with builtin_llm's weights (seed 0) and max_model_len, served as
    "twinbatch/tiny-deepseek-v2" and "tiny"; yields its base URL. Shared: tests must leave it idle."""
    from openai_server import launch_server

    with launch_server("--max-model-len", "256", "--served-model-name", "twinbatch/tiny-deepseek-v2", "tiny") as url:
        yield url


@pytest.fixture(scope="module")
def interpreter() -> Iterator[Interpreter]:
    """Runs fn(*args, **kwargs) in a worker process started with TRITON_INTERPRET=1, where Triton kernels run on
    CPU in its interpreter (tests/test_triton_decode.py says why a worker); one worker per test module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # for the worker, which inherits it at its start
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os.getpid).result()
    with pool:
        yield lambda fn, *args, **kwargs: pool.submit(fn, *args, **kwargs).result(timeout=300)
