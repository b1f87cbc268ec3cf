"""Shared fixtures: tiny Hugging Face checkpoints (built once per session) and the built-in model.

tests/ has no __init__.py, so pytest puts it on sys.path and `hf_oracle` imports as a top-level module.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest
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
