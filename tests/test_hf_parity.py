"""Our engine against Hugging Face transformers on tiny random checkpoints (float32).

Logits of the prefill and of every decode step (through the paged cache) must match HF's full-sequence
forward within 1e-4, and greedy tokens must equal HF's greedy decode, also under chunked prefill and
preemption.
"""

from pathlib import Path

import pytest
from helpers import HF_PROMPTS, assert_close_in_low_precision, assert_matches_hf, make_llm
from hf_oracle import make_deepseek_v2, make_qwen3_moe


@pytest.fixture(scope="module", params=["dsv2_dir", "dsv3_dir", "qwen3_dir"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


BACKENDS = pytest.mark.parametrize("attention_backend", ["reference", "batched"])


@pytest.mark.parametrize(("attention_backend", "moe_backend"), [("reference", "reference"), ("batched", "grouped_mm")])
def test_prefill_and_decode_match_hf(model_dir: Path, attention_backend: str, moe_backend: str) -> None:
    llm = make_llm(model_dir, attention_backend=attention_backend, moe_backend=moe_backend)
    assert_matches_hf(model_dir, llm, HF_PROMPTS)


@BACKENDS
def test_chunked_prefill_matches_hf(model_dir: Path, attention_backend: str) -> None:
    llm = make_llm(model_dir, max_num_batched_tokens=8, block_size=4, attention_backend=attention_backend)
    assert_matches_hf(model_dir, llm, HF_PROMPTS)


def test_mixed_steps_send_decodes_to_the_decode_kernel(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked prefill beside decodes: a mixed step's one-token requests take the batched decode path (the
    Triton kernel on GPU) instead of the per-request loop, and the tokens and logits still match HF."""
    from twinbatch.layers import attention

    served, decodes_of = [], attention.decodes_of

    def counting(meta: attention.AttentionMetadata) -> attention.Decodes | None:
        decodes = decodes_of(meta)
        served.append(len(decodes.requests) if decodes else 0)
        return decodes

    monkeypatch.setattr(attention, "decodes_of", counting)
    llm = make_llm(model_dir, max_num_batched_tokens=8, block_size=4, attention_backend="batched")
    assert_matches_hf(model_dir, llm, HF_PROMPTS)
    assert sum(served) > 0, "no mixed step had a decode"


@BACKENDS
def test_preemption_matches_hf(model_dir: Path, attention_backend: str) -> None:
    # 3 requests of up to 62 tokens need up to 48 blocks of 4; 24 blocks force recomputation
    llm = make_llm(model_dir, block_size=4, num_gpu_blocks_override=24, max_model_len=64,
                   attention_backend=attention_backend)  # fmt: skip
    assert assert_matches_hf(model_dir, llm, HF_PROMPTS) > 0


@pytest.mark.parametrize(("dtype", "max_rel_error"), [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_close_to_hf(model_dir: Path, dtype: str, max_rel_error: float) -> None:
    assert_close_in_low_precision(model_dir, make_llm(model_dir, dtype=dtype), max_rel_error)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    model_dir = make_deepseek_v2(tmp_path / "sharded", sharded=True)
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert_matches_hf(model_dir, make_llm(model_dir), HF_PROMPTS[:1])


def test_tied_embeddings_qwen3(tmp_path: Path) -> None:
    model_dir = make_qwen3_moe(tmp_path / "tied", tie_word_embeddings=True)
    assert_matches_hf(model_dir, make_llm(model_dir), HF_PROMPTS[:2])
