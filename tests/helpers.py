"""What several test modules share: prompts, greedy runs, logits recorders, oracles and their assertions,
attention metadata builders, and HTTP helpers for the server tests. Test modules import from here, never from
each other.

tests/ has no __init__.py, so pytest puts it on sys.path and this imports as a top-level module (also in the
worker processes the tests spawn, which inherit sys.path).
"""

import dataclasses
import functools
import itertools
import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from hf_oracle import hf_greedy, hf_logits
from prometheus_client.parser import text_string_to_metric_families

from twinbatch import LLM, SamplingParams
from twinbatch.core.step_plan import StepPlan
from twinbatch.engine.llm_engine import LLMEngine
from twinbatch.layers.attention import PADDING_SLOT, AttentionMetadata, paged_attention_reference, write_kv
from twinbatch.worker.model_runner import ModelRunnerOutput
from twinbatch.worker.ubatch.split import packed_slices, slice_requests, split_attention_metadata

# Greedy runs and processes (test_data_parallel.py)

DP_PROMPTS = [[5, 17, 42, 7, 99], list(range(30, 47)), [(i * 37) % 250 + 2 for i in range(30)], [9, 8], [3] * 12]
DP_MAX_TOKENS = [24, 4, 16, 6, 20]  # ranks finish at different steps, then idle while the other decodes


def greedy(llm: LLM, prompts: list, max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit may go unreaped in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# Dual-batch overlap (test_dbo.py)

LONG = [[(i * 13 + j) % 250 + 2 for j in range(n)] for i, n in enumerate((45, 60, 38, 52))]  # straddle the cuts


def record_logits(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, torch.Tensor]:
    """Every sampled row's logits, by request, from one DP rank's engine: greedy, and as many steps as every other
    rank takes. With DBO on, some step must have microbatched."""
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    execute = engine.model_runner.execute_model

    def recording(plan, *sampled):
        out = execute(plan, *sampled)
        for s, row in zip([s for s in plan.batch.scheduled if s.completes_prefill], out.logits, strict=True):
            rows[s.request.request_id].append(row.clone())
        return out

    engine.model_runner.execute_model = recording
    for p, n in zip(prompts, max_tokens, strict=True):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    for _ in range(max(max_tokens) + 4):  # every rank steps the same number of times
        engine.step()
    assert not engine.has_unfinished_requests()
    if engine.config.parallel.enable_dbo:
        assert engine.dbo_stats["microbatched"] > 0, engine.dbo_stats
    return {rid: torch.stack(r) for rid, r in rows.items()}


# Hugging Face parity (test_hf_parity.py)

HF_PROMPTS = [[5, 17, 42, 7, 99], list(range(30, 47)), [(i * 37) % 250 + 2 for i in range(30)]]
NEW_TOKENS = 32


def run_recording(llm: LLM, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Greedy generation that records the logits row of each sampled token, per request, and counts
    preemptions. Returns (new tokens per prompt, logits [NEW_TOKENS, vocab] per prompt, preemptions)."""
    engine = llm.llm_engine
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    preemptions = 0
    execute = engine.model_runner.execute_model

    def recording(plan: StepPlan, *sampled: object) -> ModelRunnerOutput:
        nonlocal preemptions
        preemptions += len(plan.batch.preempted)
        out = execute(plan, *sampled)
        sampled = [s.request.request_id for s in plan.batch.scheduled if s.completes_prefill]
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
    tokens, logits, _ = run_recording(llm, HF_PROMPTS)
    errors = []
    for prompt, new, ours in zip(HF_PROMPTS, tokens, logits, strict=True):
        ref = hf_logits(model_dir, prompt)[-1]
        errors.append(float((ours[0].cpu() - ref).norm() / ref.norm()))
        top2 = ref.topk(2).values
        if top2[0] - top2[1] > 0.1:
            assert new[0] == int(ref.argmax())
    assert sorted(errors)[len(errors) // 2] < max_rel_error, errors


def make_llm(model_dir: Path, **kwargs: object) -> LLM:
    return LLM(str(model_dir), **{"dtype": "float32", "max_model_len": 128, **kwargs})


# Two bf16 runs against each other (test_gpu.py)


def assert_close_until_a_tie(tokens: list[list[int]], logits: list[torch.Tensor], other_tokens: list[list[int]],
                             other_logits: list[torch.Tensor]) -> None:  # fmt: skip
    """Two bf16 greedy runs whose kernels round differently, prompt by prompt: up to and including the first
    token where they part, the steps' logits within 5% (relative L2) of the other run's, for the median step of
    the median prompt, and where they part, the first run's logits of the two tokens within 0.1 (a tie, give or
    take a few bf16 ulps at these logits' scale of ~4). Medians, because a rounding difference can route a token
    to another expert at one step (as in the bf16 HF-parity test): on H200 the worst step of three prompts was
    2%, 8% and 9% off with every greedy token equal; on CPU with Inductor the worst of six prompts 8.9%, the
    median 2%. A 20% error on every step fails."""
    errors = []
    for toks, rows, other, other_rows in zip(tokens, logits, other_tokens, other_logits, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(toks, other, strict=True)) if a != b), len(toks))
        steps = [float((rows[i] - other_rows[i]).norm() / rows[i].norm()) for i in range(min(n + 1, len(toks)))]
        errors.append(sorted(steps)[len(steps) // 2])
        if n < len(toks):
            gap = float(rows[n][toks[n]] - rows[n][other[n]])
            assert gap <= 0.1, f"token {n}: {toks[n]} vs {other[n]} with a logit gap of {gap}"
    assert sorted(errors)[len(errors) // 2] < 0.05, errors


# Triton kernels and the paged decode oracle (test_triton_decode.py)

Interpreter = Callable[..., Any]  # conftest's `interpreter` fixture: runs fn(*args, **kwargs) in its worker


def widen_bf16_dot() -> None:
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


# Microbatched attention over a real paged KV cache (test_ubatch_split.py)

BLOCK, NUM_BLOCKS, KV_HEADS, HEADS, HEAD_DIM = 4, 64, 2, 4, 8
MIXED = ([7, 0, 13, 5, 0, 21, 3], [1, 9, 1, 7, 4, 1, 11])  # decodes and prefill chunks, some on cached context


def make_meta(context: list[int], new: list[int], pad: int = 0, block: int = BLOCK) -> AttentionMetadata:
    """Requests with context[i] cached tokens and new[i] tokens this pass, each on distinct random blocks."""
    gen = torch.Generator().manual_seed(0)
    seq_lens = [c + n for c, n in zip(context, new, strict=True)]
    counts = [math.ceil(s / block) for s in seq_lens]
    ids = (torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1)[: sum(counts)].split(counts)
    tables = torch.zeros(len(new), max(counts), dtype=torch.int32)
    slots: list[int] = []
    for i, (b, c, s) in enumerate(zip(ids, context, seq_lens, strict=True)):
        tables[i, : len(b)] = b
        slots += [int(b[p // block]) * block + p % block for p in range(c, s)]
    query_start_loc = torch.tensor([0, *itertools.accumulate(new)], dtype=torch.int32)
    slot_mapping = torch.tensor(slots + [PADDING_SLOT] * pad, dtype=torch.int64)
    return AttentionMetadata(query_start_loc, torch.tensor(seq_lens, dtype=torch.int32), tables, slot_mapping, block)


def run_attention(meta: AttentionMetadata, bounds: list[int] | None, reverse: bool = False, split: bool = False
                  ) -> torch.Tensor:  # fmt: skip
    """One attention layer: writes the new tokens' KV, then attends, whole or microbatch by microbatch. split: as
    a fast backend does, the decodes to a decode function (here the loop over them alone), the rest packed."""
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(NUM_BLOCKS, meta.block_size, 2, KV_HEADS, HEAD_DIM, generator=gen)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen)
    kv = torch.randn(meta.num_tokens, 2, KV_HEADS, HEAD_DIM, generator=gen)
    parts = [(slice(0, meta.num_tokens), meta)]
    if bounds is not None:
        slices = packed_slices(meta.num_reqs, bounds) if meta.context_bound else slice_requests(meta.host[0], bounds)
        parts = [(s.tokens, split_attention_metadata(meta, s)) for s in slices]
    out = torch.empty(meta.num_tokens, HEADS, HEAD_DIM)
    attend = functools.partial(paged_attention_reference, cache=cache, expand_kv=lambda e: e.unbind(1),
                               scale=HEAD_DIM**-0.5, v_dim=HEAD_DIM)  # fmt: skip
    for tokens, m in reversed(parts) if reverse else parts:
        write_kv(cache, m.slot_mapping, kv[tokens])
        decode = (lambda rows, sub, qs=q[tokens]: attend(qs[rows], meta=sub)) if split else None
        out[tokens] = attend(q[tokens], meta=m, decode=decode)
    return out


# The packed prefill layout (test_packed_prefill.py)


def packed(meta: AttentionMetadata, empty_rows: int, spare: int) -> AttentionMetadata:
    """meta in the packed layout: `empty_rows` request rows with no tokens appended (a graph's padding rows),
    the context bound `spare` rows past the sum of seq_lens."""
    zeros = torch.zeros(empty_rows, dtype=torch.int32, device=meta.seq_lens.device)
    return dataclasses.replace(
        meta,
        query_start_loc=torch.cat([meta.query_start_loc, meta.query_start_loc[-1:].repeat(empty_rows)]),
        seq_lens=torch.cat([meta.seq_lens, zeros]),
        block_tables=torch.cat([meta.block_tables, zeros[:, None].expand(-1, meta.block_tables.shape[1])]),
        context_bound=int(meta.seq_lens.sum()) + spare,
    )


# The OpenAI-compatible server over HTTP (test_server.py)


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def six_expert_checkpoint(dsv2_dir: Path, tmp_path: Path) -> Path:
    """The tiny DeepSeek-V2 config with 6 routed experts (3 groups), for three EP ranks; dummy weights."""
    config = json.loads((dsv2_dir / "config.json").read_text())
    config |= {"n_routed_experts": 6, "n_group": 3, "topk_group": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path
