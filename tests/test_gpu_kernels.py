"""The Triton decode kernel and the Triton experts on a CUDA GPU: against the "batched" / grouped_mm paths and the
reference on real shapes, timing prints, and whole models on the "triton" backends. Run with
`python -m pytest -m gpu -s tests/test_gpu_kernels.py`.
"""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_close_until_a_tie, greedy, make_cache, make_meta, packed, reference, run_recording

from twinbatch import LLM
from twinbatch.config.model import ModelConfig
from twinbatch.layers.attention import AttentionMetadata
from twinbatch.layers.moe import Experts, forward_grouped, forward_reference
from twinbatch.layers.rotary import RotaryEmbedding
from twinbatch.models.deepseek_v2 import DeepseekV2Attention
from twinbatch.models.presets import PRESETS
from twinbatch.models.qwen3_moe import Qwen3MoeAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

V2_LITE = ModelConfig.from_dict(PRESETS["deepseek-ai/DeepSeek-V2-Lite"])  # MLA: 16 heads, 512 + 64
QWEN3 = dataclasses.replace(V2_LITE, architecture="Qwen3MoeForCausalLM", kv_lora_rank=0, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128)  # fmt: skip  # Qwen3-30B-A3B's attention


def attention(cfg: ModelConfig, cache: torch.Tensor) -> DeepseekV2Attention | Qwen3MoeAttention:
    """The model's attention module (weights on the meta device: decode attention reads only the cache)."""
    with torch.device("meta"):
        rotary = RotaryEmbedding(cfg.rope, cfg.qk_rope_head_dim or cfg.head_dim, 16)
        attn = DeepseekV2Attention(cfg, rotary) if cfg.use_mla else Qwen3MoeAttention(cfg, rotary)
    attn.kv_cache = cache
    return attn


def v2_lite_inputs(seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """(q_latent, q_pe, cache, meta) in bf16 for 16 heads x (512 + 64), blocks of 16, plus 3 padding requests."""
    cache, meta = make_cache((576,), 16, seq_lens, num_padding=3, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(meta.num_reqs, 16, 576, device="cuda").bfloat16()
    return q[..., :512].contiguous(), q[..., 512:], cache, meta


def test_mla_triton_matches_batched_and_reference() -> None:
    """DeepSeek-V2-Lite decode in bf16: 256 requests of up to 4096 tokens (and 3 CUDA-graph padding requests)."""
    from twinbatch.layers import triton_decode

    seq_lens = torch.randint(1, 4097, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    q_latent, q_pe, cache, meta = v2_lite_inputs([1, 4096, *seq_lens[2:]])
    attn = attention(V2_LITE, cache)
    out = triton_decode.mla_decode(q_latent, q_pe, cache, meta, attn.scale)
    batched = attn._latent_attention_batched(q_latent, q_pe, meta)
    expected = reference(torch.cat([q_latent, q_pe], -1), cache, meta, attn.scale, 512, mla=True)
    assert not out.isnan().any()
    assert_as_close_as_batched(out, batched, expected)


def assert_as_close_as_batched(out: torch.Tensor, batched: torch.Tensor, expected: torch.Tensor) -> None:
    """Within bf16 rounding of the float32 reference, and no further from it than the batched path (which rounds
    its scores to bf16, so the two differ from each other by more than either from the reference)."""
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=0)
    error, batched_error = (out.float() - expected).abs().max(), (batched.float() - expected).abs().max()
    assert error <= batched_error * 1.1, (error, batched_error)


@pytest.mark.parametrize("num_reqs", [3, 64])
def test_gqa_triton_matches_batched_and_reference(num_reqs: int) -> None:
    """Qwen3-style GQA (32 heads over 4 kv heads of 128) in bf16; 3 requests force several splits."""
    from twinbatch.layers import triton_decode

    seq_lens = torch.randint(1, 3000, (num_reqs,), generator=torch.Generator().manual_seed(1)).tolist()
    cache, meta = make_cache((2, 4, 128), 16, seq_lens, num_padding=2, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(meta.num_reqs, 32, 128, device="cuda").bfloat16()
    out = triton_decode.gqa_decode(q, cache, meta, 128**-0.5)
    batched = attention(QWEN3, cache)._decode_batched(q, meta)
    assert_as_close_as_batched(out, batched, reference(q, cache, meta, 128**-0.5, 128, mla=False))


def time_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """GPU time per call, replayed from a CUDA graph of `iters` calls (as decode steps run): no launch overhead."""
    fn()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


@pytest.mark.parametrize(("num_reqs", "context"), [(256, 1024), (256, 4096), (8, 4096)])
def test_mla_decode_timing(num_reqs: int, context: int) -> None:
    """Printed with -s, not asserted: one V2-Lite layer's decode attention, triton vs batched (CUDA-graph replay)."""
    from twinbatch.layers import triton_decode

    q_latent, q_pe, cache, meta = v2_lite_inputs([context] * num_reqs)
    attn = attention(V2_LITE, cache)
    triton_ms = time_ms(lambda: triton_decode.mla_decode(q_latent, q_pe, cache, meta, attn.scale))
    batched_ms = time_ms(lambda: attn._latent_attention_batched(q_latent, q_pe, meta))
    gbytes = num_reqs * context * 576 * 2 / 1e9  # the cache entries read
    print(f"\nMLA decode, {num_reqs} reqs x ctx {context} ({gbytes:.2f} GB of KV): triton {triton_ms:.3f} ms "
          f"({gbytes / triton_ms:.2f} TB/s), batched {batched_ms:.3f} ms: {batched_ms / triton_ms:.1f}x")  # fmt: skip


PROMPTS = [[5, 17, 42, 7, 99], list(range(30, 47)), [(i * 37) % 250 + 2 for i in range(400)]]  # 400: split-K


@pytest.fixture(scope="module", params=["dsv2_dir", "dsv3_dir", "qwen3_dir"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def test_triton_backend_greedy_equals_reference(model_dir: Path) -> None:
    """float32, eager: the kernel alone differs between the two runs."""
    kwargs = {"device": "cuda", "dtype": "float32", "max_model_len": 512, "enforce_eager": True}
    expected = greedy(LLM(str(model_dir), attention_backend="reference", **kwargs), PROMPTS, [16] * 3)
    assert greedy(LLM(str(model_dir), attention_backend="triton", **kwargs), PROMPTS, [16] * 3) == expected


def test_triton_backend_in_cuda_graphs_equals_eager(model_dir: Path) -> None:
    """bf16 with grouped-GEMM experts: decode steps replay as CUDA graphs (the kernel never waits for the host)."""
    graphs_match_eager(model_dir, dtype="bfloat16", attention_backend="triton", moe_backend="grouped_mm")


def graphs_match_eager(model_dir: Path, **kwargs: str) -> None:
    """Graphs on against --enforce-eager: float32 gives the same tokens. In bf16 the two runs' prefill attention
    differs (packed variable-length flash in a graph, cuDNN per request eagerly), so they are held to the bf16
    standard of assert_close_until_a_tie (on H200 the Triton experts' run parted at one token)."""
    kwargs = {"device": "cuda", "max_model_len": 512, **kwargs}
    eager = run_recording(LLM(str(model_dir), enforce_eager=True, **kwargs), PROMPTS)
    llm = LLM(str(model_dir), **kwargs)
    graphed = run_recording(llm, PROMPTS)
    assert llm.llm_engine.model_runner.graphs.graphs, "no step ran as a CUDA graph"
    if kwargs["dtype"] == "float32":
        assert graphed[0] == eager[0]
    else:
        assert_close_until_a_tie(*eager[:2], *graphed[:2])


# The fused Triton experts (moe_backend="triton") on DeepSeek-V2-Lite's per-rank shapes under 2-way expert
# parallelism: 32 local experts of 64, hidden 2048, intermediate 1408, top-6.


def v2_lite_experts() -> Experts:
    torch.manual_seed(0)
    experts = Experts(32, 2048, 1408).to("cuda", torch.bfloat16)
    for p in experts.parameters():
        p.data.normal_(0, 0.02)
    return experts


def v2_lite_routing(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, topk_weights, local ids): 6 distinct experts of 64 per token; those of the other rank (32..63) map to
    32, as the all-to-all's local ids do, so about half of the pairs are skipped."""
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    ids = torch.rand(num_tokens, 64, device="cuda", generator=gen).topk(6, dim=-1).indices
    x = torch.randn(num_tokens, 2048, device="cuda", generator=gen).bfloat16()
    return x, torch.rand(num_tokens, 6, device="cuda", generator=gen), ids.clamp(max=32)


@pytest.mark.parametrize("num_tokens", [256, 4096])
def test_triton_experts_match_grouped_mm_and_reference(num_tokens: int) -> None:
    from twinbatch.layers import triton_moe

    experts, (x, weights, ids) = v2_lite_experts(), v2_lite_routing(num_tokens)
    out = triton_moe.fused_experts(x, experts.gate_up_proj, experts.down_proj, weights, ids)
    assert torch.equal(out, triton_moe.fused_experts(x, experts.gate_up_proj, experts.down_proj, weights, ids))
    grouped = forward_grouped(x, weights, ids, experts.gate_up_proj, experts.down_proj)
    expected = forward_reference(x.float(), weights, ids, experts.gate_up_proj.float(), experts.down_proj.float())
    assert not out.isnan().any()
    assert_as_close_as_batched(out, grouped, expected)


@pytest.mark.parametrize("num_tokens", [256, 4096])
def test_triton_experts_timing(num_tokens: int) -> None:
    """Printed with -s, not asserted: one layer's routed experts, triton vs grouped_mm (CUDA-graph replay), and the
    rate at which each reads the expert weights (every local expert gets tokens at these sizes)."""
    from twinbatch.layers import triton_moe

    experts, (x, weights, ids) = v2_lite_experts(), v2_lite_routing(num_tokens)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    tiles = triton_moe.tiles_for(ids.numel() / 32, x.dtype)
    triton_ms = time_ms(lambda: triton_moe.fused_experts(x, gate_up, down, weights, ids))
    align_ms = time_ms(lambda: triton_moe.align_block_size(ids, 32, tiles.block_m))
    grouped_ms = time_ms(lambda: forward_grouped(x, weights, ids, experts.gate_up_proj, experts.down_proj))
    gbytes = (gate_up.numel() + down.numel()) * 2 / 1e9
    print(f"\nMoE experts, {num_tokens} tokens x top-6, 32 local experts ({gbytes:.2f} GB of weights), {tiles}: "
          f"triton {triton_ms:.3f} ms ({gbytes / triton_ms:.2f} TB/s; align step {align_ms:.3f} ms), grouped_mm "
          f"{grouped_ms:.3f} ms ({gbytes / grouped_ms:.2f} TB/s): {grouped_ms / triton_ms:.2f}x")  # fmt: skip


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_triton_moe_backend_in_cuda_graphs_equals_eager(model_dir: Path, dtype: str) -> None:
    """Decode steps with Triton experts replay as CUDA graphs (no host synchronisation, in either dtype)."""
    graphs_match_eager(model_dir, dtype=dtype, attention_backend="triton", moe_backend="triton")


def test_triton_moe_backend_greedy_equals_reference(model_dir: Path) -> None:
    """float32, eager: only the experts differ between the two runs."""
    kwargs = {"device": "cuda", "dtype": "float32", "max_model_len": 512, "enforce_eager": True}
    expected = greedy(LLM(str(model_dir), moe_backend="reference", **kwargs), PROMPTS, [16] * 3)
    assert greedy(LLM(str(model_dir), moe_backend="triton", **kwargs), PROMPTS, [16] * 3) == expected


@pytest.mark.parametrize(("qk_dim", "v_dim", "kv_heads"), [(192, 128, 16), (128, 128, 4)])  # MLA expanded, GQA
@pytest.mark.parametrize("k", [None, 2])
def test_packed_flash_attention_matches_the_loop(qk_dim: int, v_dim: int, kv_heads: int, k: int | None) -> None:
    """The packed layout of prefill graphs (variable-length flash, v padded for MLA) against the per-request
    SDPA loop in bfloat16: prefill chunks on cached context, decodes, padding tokens and empty request rows,
    whole and cut into microbatches; then the same captured in a CUDA graph and replayed."""
    from twinbatch.core.step_plan import ubatch_bounds
    from twinbatch.layers.attention import paged_attention_reference, write_kv
    from twinbatch.worker.ubatch.split import packed_slices, slice_requests, split_attention_metadata

    context, new = [0, 300, 33, 0, 90, 200], [200, 1, 64, 1, 129, 1]  # 36 blocks of 32 (make_meta has 63)
    meta = make_meta(context, new, pad=13, block=32)
    meta = dataclasses.replace(meta, **{f: getattr(meta, f).cuda() for f in
                                        ("query_start_loc", "seq_lens", "block_tables", "slot_mapping")})  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(0)
    heads, blocks = 16 if kv_heads == 16 else 32, int(meta.block_tables.max()) + 1
    cache = torch.randn(blocks, 32, kv_heads, qk_dim + v_dim, device="cuda", generator=gen).bfloat16()
    q = torch.randn(meta.num_tokens, heads, qk_dim, device="cuda", generator=gen).bfloat16()
    entries = torch.randn(meta.num_tokens, kv_heads, qk_dim + v_dim, device="cuda", generator=gen).bfloat16()
    expand = lambda e: e.split([qk_dim, v_dim], dim=-1)  # noqa: E731

    def run(m: AttentionMetadata) -> torch.Tensor:
        bounds = ubatch_bounds(m.num_tokens, k) if k else [0, m.num_tokens]
        cut = packed_slices(m.num_reqs, bounds) if m.context_bound else slice_requests(m.host[0], bounds)
        out = q.new_zeros(q.shape[0], heads, v_dim)
        for s in cut:
            sub = split_attention_metadata(m, s)
            write_kv(cache, sub.slot_mapping, entries[s.tokens])
            out[s.tokens] = paged_attention_reference(q[s.tokens], cache, sub, expand, qk_dim**-0.5, v_dim)
        return out

    want = run(meta)
    pm = packed(meta, 3, 100)
    got = run(pm)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
    graph = torch.cuda.CUDAGraph()
    run(pm)  # warm-up outside capture
    with torch.cuda.graph(graph):
        captured = run(pm)
    graph.replay()
    torch.testing.assert_close(captured, got, atol=0, rtol=0)
