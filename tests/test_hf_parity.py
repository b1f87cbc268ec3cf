"""Our engine against Hugging Face transformers on tiny random checkpoints (float32).

Logits of the prefill and of every decode step (through the paged cache) must match HF's full-sequence
forward within 1e-4, and greedy tokens must equal HF's greedy decode, also under chunked prefill and
preemption.
"""

from collections import defaultdict
from pathlib import Path

import pytest
import torch
from hf_oracle import hf_greedy, hf_logits, make_deepseek_v2, make_qwen3_moe

from twinbatch import LLM, SamplingParams
from twinbatch.worker.model_runner import ModelRunnerOutput
from twinbatch.worker.scheduler import SchedulerOutput

PROMPTS = [[5, 17, 42, 7, 99], list(range(30, 47)), [(i * 37) % 250 + 2 for i in range(30)]]
NEW_TOKENS = 32


def run_recording(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Greedy generation that records the logits row of each sampled token, per request, and counts
    preemptions. Returns (new tokens per prompt, logits [NEW_TOKENS, vocab] per prompt, preemptions)."""
    engine = llm.llm_engine
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    preemptions = 0
    execute = engine.model_runner.execute_model

    def recording(batch: SchedulerOutput, *args: int | None) -> ModelRunnerOutput:
        nonlocal preemptions
        preemptions += len(batch.preempted)
        out = execute(batch, *args)
        sampled = [s.request.request_id for s in batch.scheduled if s.completes_prefill]
        for rid, row in zip(sampled, out.logits, strict=True):
            rows[rid].append(row.clone())
        return out

    engine.model_runner.execute_model = recording
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        engine.model_runner.execute_model = execute
    return [o.outputs[0].token_ids for o in outs], [torch.stack(rows[o.request_id]) for o in outs], preemptions


def assert_matches_hf(model_dir: Path, llm: LLM, prompts: list[list[int]]) -> int:
    tokens, logits, preemptions = run_recording(llm, prompts)
    for prompt, new, ours in zip(prompts, tokens, logits, strict=True):
        assert new == hf_greedy(model_dir, prompt, NEW_TOKENS)
        ref = hf_logits(model_dir, prompt + new[:-1])[len(prompt) - 1 :]  # the rows that predicted `new`
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours.cpu(), ref, atol=1e-4, rtol=0)
    return preemptions


def assert_close_in_low_precision(model_dir: Path, llm: LLM, max_rel_error: float) -> None:
    """Half-precision runs against HF float32: the first token's logits within max_rel_error (relative L2) for the
    median prompt (one prompt may route a token to another expert after rounding), and the same first greedy token
    wherever HF's top-2 margin exceeds 0.1."""
    tokens, logits, _ = run_recording(llm, PROMPTS)
    errors = []
    for prompt, new, ours in zip(PROMPTS, tokens, logits, strict=True):
        ref = hf_logits(model_dir, prompt)[-1]
        errors.append(float((ours[0].cpu() - ref).norm() / ref.norm()))
        top2 = ref.topk(2).values
        if top2[0] - top2[1] > 0.1:
            assert new[0] == int(ref.argmax())
    assert sorted(errors)[len(errors) // 2] < max_rel_error, errors


def make_llm(model_dir: Path, **kwargs: object) -> LLM:
    return LLM(str(model_dir), **{"dtype": "float32", "max_model_len": 128, **kwargs})


@pytest.fixture(scope="module", params=["dsv2_dir", "dsv3_dir", "qwen3_dir"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


BACKENDS = pytest.mark.parametrize("attention_backend", ["reference", "batched"])


@pytest.mark.parametrize(("attention_backend", "moe_backend"), [("reference", "reference"), ("batched", "grouped_mm")])
def test_prefill_and_decode_match_hf(model_dir: Path, attention_backend: str, moe_backend: str) -> None:
    llm = make_llm(model_dir, attention_backend=attention_backend, moe_backend=moe_backend)
    assert_matches_hf(model_dir, llm, PROMPTS)


@BACKENDS
def test_chunked_prefill_matches_hf(model_dir: Path, attention_backend: str) -> None:
    llm = make_llm(model_dir, max_num_batched_tokens=8, block_size=4, attention_backend=attention_backend)
    assert_matches_hf(model_dir, llm, PROMPTS)


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
    assert_matches_hf(model_dir, llm, PROMPTS)
    assert sum(served) > 0, "no mixed step had a decode"


@BACKENDS
def test_preemption_matches_hf(model_dir: Path, attention_backend: str) -> None:
    # 3 requests of up to 62 tokens need up to 48 blocks of 4; 24 blocks force recomputation
    llm = make_llm(model_dir, block_size=4, num_gpu_blocks_override=24, max_model_len=64,
                   attention_backend=attention_backend)  # fmt: skip
    assert assert_matches_hf(model_dir, llm, PROMPTS) > 0


@pytest.mark.parametrize(("dtype", "max_rel_error"), [("bfloat16", 0.05), ("float16", 0.01)])
def test_half_precision_close_to_hf(model_dir: Path, dtype: str, max_rel_error: float) -> None:
    assert_close_in_low_precision(model_dir, make_llm(model_dir, dtype=dtype), max_rel_error)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    model_dir = make_deepseek_v2(tmp_path / "sharded", sharded=True)
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert_matches_hf(model_dir, make_llm(model_dir), PROMPTS[:1])


def test_tied_embeddings_qwen3(tmp_path: Path) -> None:
    model_dir = make_qwen3_moe(tmp_path / "tied", tie_word_embeddings=True)
    assert_matches_hf(model_dir, make_llm(model_dir), PROMPTS[:2])
