"""Bad input fails early with a message that names the problem, and leaves the engine as it was.

After every rejected request the same LLM must still serve a valid one, with no request or KV block left
behind by the rejected call.
"""

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from twinbatch import LLM, SamplingParams
from twinbatch.entrypoints.cli import main

MAX_LEN = 256  # the builtin_llm fixture's max_model_len
GREEDY = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def assert_serves(llm: LLM, prompt: str | list[int] = "Hello") -> None:
    """Nothing was left queued or holding blocks, and a valid request still gets its tokens."""
    engine = llm.llm_engine
    assert not engine.requests and not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
    (out,) = llm.generate([prompt], GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 3 and out.outputs[0].finish_reason == "length"
    assert not engine.requests


# Checkpoints that do not match the model they claim to be.


def drop_tensor(name: str) -> Callable[[Path], None]:
    def corrupt(model_dir: Path) -> None:
        weights = load_file(model_dir / "model.safetensors")
        del weights[name]
        save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})

    return corrupt


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def corrupt(model_dir: Path) -> None:
        path = model_dir / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | changes))

    return corrupt


def delete(name: str) -> Callable[[Path], None]:
    return lambda model_dir: (model_dir / name).unlink()


@pytest.mark.parametrize(
    ("corrupt", "error", "match"),
    [
        *[
            pytest.param(drop_tensor(name), ValueError, f"missing weights: {re.escape(name)}", id=f"drop-{name}")
            for name in (
                "model.layers.1.mlp.experts.3.up_proj.weight",
                "model.layers.0.self_attn.kv_a_layernorm.weight",
                "lm_head.weight",
            )
        ],
        pytest.param(
            edit_config(moe_intermediate_size=48),
            ValueError,
            r"weight model\.layers\.\d+\.mlp\.\S+: checkpoint shape",
            id="shape",
        ),
        pytest.param(
            edit_config(architectures=["LlamaForCausalLM"]),
            ValueError,
            "'LlamaForCausalLM' is not supported",
            id="architecture",
        ),
        pytest.param(delete("config.json"), FileNotFoundError, "has no config.json", id="no-config"),
        pytest.param(delete("model.safetensors"), FileNotFoundError, r"no \*\.safetensors files", id="no-weights"),
    ],
)
def test_bad_checkpoint(
    dsv2_dir: Path, tmp_path: Path, corrupt: Callable[[Path], None], error: type[Exception], match: str
) -> None:
    model_dir = Path(shutil.copytree(dsv2_dir, tmp_path / "ckpt"))
    LLM(str(model_dir), dtype="float32", max_model_len=32)  # the unmodified copy loads
    corrupt(model_dir)
    with pytest.raises(error, match=match):
        LLM(str(model_dir), dtype="float32", max_model_len=32)


# Engine options: all of these fail before any weights are built.


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": "no/such-model"}, ValueError, "neither a local checkpoint directory nor a built-in preset"),
        ({"bogus_option": 1}, TypeError, r"unknown engine option\(s\) \['bogus_option'\]"),
        ({"dtype": "int8"}, ValueError, "dtype='int8' is not supported"),
        ({"max_num_seqs": 0}, ValueError, "max_num_seqs must be >= 1"),
        ({"max_model_len": -1}, ValueError, "max_model_len must be >= 1"),
        ({"max_num_batched_tokens": -3}, ValueError, "max_num_batched_tokens must be >= 1"),
        ({"max_model_len": 4096, "num_gpu_blocks_override": 8}, ValueError, r"max_model_len \(4096\) does not fit"),
        ({"load_format": "pt"}, ValueError, "load_format='pt'"),
        ({"load_format": "safetensors"}, ValueError, "has no weight files; use load_format='dummy'"),
        pytest.param(
            {"device": "cuda"},
            ValueError,
            "no CUDA GPU is visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
        pytest.param({"block_size": 0}, ValueError, "block_size must be >= 1", id="block_size-0"),
        pytest.param({"device": "tpu"}, ValueError, "device='tpu' is not supported", id="device-tpu"),
        pytest.param(
            {"max_model_len": 0, "num_gpu_blocks_override": 3},
            ValueError,
            "max_model_len must be >= 1",
            id="max_model_len-0",
        ),
    ],
)
def test_bad_engine_option(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LLM(**kwargs)


# Prompts, on the shared built-in model.


@pytest.mark.parametrize(
    ("prompts", "match"),
    [
        pytest.param(
            [list(range(2, 2 + MAX_LEN))],
            f"context length is {MAX_LEN} tokens. However, your request has {MAX_LEN} input tokens, which leaves no",
            id="ids-too-long",
        ),
        pytest.param(
            "hello " * 300, "context length is 256 tokens. However, your request has 301 input", id="text-long"
        ),
        pytest.param("x" * 40_000, "your request has at least 313 input tokens", id="text-far-too-long"),
        pytest.param("", "the prompt is empty", id="empty-text"),
        pytest.param([[]], "the prompt is empty", id="empty-ids"),
        pytest.param({"prompt_token_ids": []}, "the prompt is empty", id="empty-dict"),
        pytest.param([[5, 129280]], r"token ids \[129280\] are outside the model's vocabulary", id="id-too-big"),
        pytest.param([[-1, 5]], r"token ids \[-1\] are outside", id="id-negative"),
        pytest.param([[5, 1.5]], "a prompt must be a string or a list of token ids", id="id-float"),
        pytest.param(["Hi", [5, 6], [], "Hello"], "the prompt is empty", id="batch-one-empty"),
        pytest.param(["Hi", [5, 129280]], "outside the model's vocabulary", id="batch-one-bad-id"),
        pytest.param(5, "prompts must be a string, a list of token ids", id="int-prompt"),
    ],
)
def test_bad_prompt(builtin_llm: LLM, prompts: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        builtin_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert_serves(builtin_llm)


def test_longest_prompt_is_accepted(builtin_llm: LLM) -> None:
    (out,) = builtin_llm.generate([list(range(2, 1 + MAX_LEN))], GREEDY, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
    assert_serves(builtin_llm)


SAMPLING_CASES = [
    ({"max_tokens": -1}, "max_tokens must be at least 1"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": math.nan}, r"top_p must be in \(0, 1\]"),
    ({"temperature": -1.0}, "temperature must be a number >= 0"),
    ({"temperature": math.nan}, "temperature must be a number >= 0"),
    ({"top_k": -2}, "top_k must be -1 or 0"),
    ({"n": 2}, "n must be 1"),
]


@pytest.mark.parametrize(("kwargs", "match"), SAMPLING_CASES)
def test_bad_sampling_params(builtin_llm: LLM, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
    params = SamplingParams(max_tokens=2)
    for name, value in kwargs.items():  # fields set after construction are checked again by generate
        setattr(params, name, value)
    with pytest.raises(ValueError, match=match):
        builtin_llm.generate(["Hi", "Hello"], [SamplingParams(max_tokens=2), params], use_tqdm=False)
    assert_serves(builtin_llm)


def test_sampling_params_count_must_match(builtin_llm: LLM) -> None:
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        builtin_llm.generate(["Hi", "Hello"], [GREEDY], use_tqdm=False)
    assert_serves(builtin_llm)


def test_duplicate_request_id(builtin_llm: LLM) -> None:
    engine = builtin_llm.llm_engine
    engine.add_request([5, 6, 7], GREEDY, request_id="dup")
    with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
        engine.add_request([8, 9], GREEDY, request_id="dup")
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [(o.request_id, o.prompt_token_ids, len(o.outputs[0].token_ids)) for o in outs] == [("dup", [5, 6, 7], 3)]
    assert_serves(builtin_llm)


@pytest.fixture(scope="module")
def ids_only_llm(dsv2_dir: Path) -> LLM:
    return LLM(str(dsv2_dir), dtype="float32", max_model_len=64)


def test_text_prompt_without_tokenizer(ids_only_llm: LLM) -> None:
    assert ids_only_llm.get_tokenizer() is None
    with pytest.raises(ValueError, match="no tokenizer files; pass prompts as lists of token ids"):
        ids_only_llm.generate([[5, 6], "Hello"], GREEDY, use_tqdm=False)
    assert_serves(ids_only_llm, [5, 6, 7])


# The command line: bad values end in `error: ...` (exit status 1), not a traceback.


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--max-num-seqs", "0"], "max_num_seqs must be >= 1"),
        (["--model", "no/such-model"], "neither a local checkpoint directory"),
        (["--top-p", "1.5", "--max-model-len", "64"], r"top_p must be in \(0, 1\]"),
    ],
)
def test_cli_bad_value(argv: list[str], match: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "Hi", *argv])
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("error: ")
    assert re.search(match, exc.value.code)


def test_cli_checkpoint_without_config(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "Hi", "--model", str(tmp_path)])
    assert str(exc.value.code).startswith("error: ") and "config.json" in str(exc.value.code)


def test_cli_value_outside_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    """A flag with a closed set of values is checked while parsing: the usage error lists the choices."""
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "Hi", "--dtype", "int8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: twinbatch generate ")
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "argument --dtype: invalid choice: 'int8' (choose from " in line
    assert all(name in line for name in ("auto", "float32", "bfloat16", "float16"))


def test_cli_unparsable_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "Hi", "--max-tokens", "many"])
    assert exc.value.code == 2 and "--max-tokens: invalid int value: 'many'" in capsys.readouterr().err


def test_cli_generate(builtin_llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    """Same built-in weights (seed 0) and greedy decoding: the CLI prints what the Python API returns."""
    main(["generate", "--prompt", "Hi", "--max-tokens", "4"])
    (ref,) = builtin_llm.generate("Hi", SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    c = ref.outputs[0]
    printed = capsys.readouterr().out
    assert f"Prompt: 'Hi'\nOutput: {c.text!r}\nTokens: {c.token_ids} ({c.finish_reason})\n" in printed
