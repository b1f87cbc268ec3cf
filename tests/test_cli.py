"""The command line as a newcomer meets it: help for every flag, --version, usage errors under the subcommand's
own usage line, and `generate` saying when its text means nothing and what DBO did."""

import argparse
import dataclasses
import importlib.metadata
import json
import re
from pathlib import Path

import pytest
import torch

import twinbatch
from twinbatch import LLM
from twinbatch.bench.step_report import MIN_COMM_SHARE, overlap_efficiency
from twinbatch.config import ATTENTION_BACKENDS, MOE_BACKENDS, resolve_dtype
from twinbatch.distributed.all2all import BACKENDS
from twinbatch.engine.arg_utils import EngineArgs
from twinbatch.entrypoints.cli import main, make_parser, random_weights_note
from twinbatch.models.presets import BUILTIN_MODEL, PRESETS
from twinbatch.tokenizer import builtin_tokenizer_dir

COMMANDS = [["generate"], ["serve"], ["bench", "step"]]
CHOICES = {
    "--dtype": {"auto", "float32", "float16", "bfloat16"},
    "--all2all-backend": set(BACKENDS),
    "--attention-backend": {"auto", *ATTENTION_BACKENDS},
    "--moe-backend": {"auto", *MOE_BACKENDS},
    "--load-format": {"auto", "safetensors", "dummy"},
}
DP2 = ["--data-parallel-size", "2", "--enable-expert-parallel", "--all2all-backend", "all2all", "--enable-dbo"]
PROMPTS = ["--prompt", "Hello there my friend", "--prompt", "Hi you", "--prompt", "The capital of", "--prompt", "1 2 3"]


def subcommand(names: list[str]) -> argparse.ArgumentParser:
    parser = make_parser()
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


def flag_help(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_describes_every_engine_flag(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    printed = capsys.readouterr().out
    assert exc.value.code == 0 and printed.startswith(f"usage: twinbatch {' '.join(command)} ")
    parser = subcommand(command)
    for field in dataclasses.fields(EngineArgs):
        flag = "--" + field.name.replace("_", "-")
        action = flag_help(parser, flag)
        assert flag in printed
        assert re.sub(r"\(default: %\(default\)s\)", "", action.help or "").strip(), f"{flag} has no description"
    for flag, expected in CHOICES.items():
        choices = flag_help(parser, flag).choices
        assert expected <= set(choices), flag
        assert f"{flag} {{{','.join(choices)}}}" in printed


def test_help_choices_are_values_the_engine_accepts() -> None:
    for name in flag_help(subcommand(["generate"]), "--dtype").choices:
        assert isinstance(resolve_dtype(name, None, torch.device("cpu")), torch.dtype)


def test_help_of_model_names_the_builtin_model() -> None:
    text = flag_help(subcommand(["generate"]), "--model").help
    assert "built-in model" in text and "random weights" in text and "DeepSeek-V2" in text
    assert all(name in text for name in PRESETS)


def test_compilation_level_flag_as_in_vllm() -> None:
    assert make_parser().parse_args(["generate", "-O0"]).compilation_config == "0"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"twinbatch {importlib.metadata.version('twinbatch')}\n"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_unknown_flag_shows_the_subcommand_usage(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--bogus"])
    err = capsys.readouterr().err
    name = " ".join(command)
    assert exc.value.code == 2
    assert err.startswith(f"usage: twinbatch {name} ")
    assert f"twinbatch {name}: error: unrecognized arguments: --bogus" in err


def checkpoint_dir(path: Path) -> Path:
    """A checkpoint of the built-in model's shapes with no weight files: only --load-format dummy can run it."""
    (path / "config.json").write_text(json.dumps(PRESETS[BUILTIN_MODEL]))
    return path


@pytest.mark.parametrize("checkpoint", [False, True], ids=["builtin", "checkpoint"])
def test_generate_says_when_weights_are_random(
    checkpoint: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(checkpoint_dir(tmp_path)) if checkpoint else BUILTIN_MODEL
    extra = ["--model", model, "--load-format", "dummy", "--tokenizer", str(builtin_tokenizer_dir())]
    main(["generate", "--prompt", "Hi", "--max-tokens", "2", "--max-model-len", "32", *(extra if checkpoint else [])])
    out, err = capsys.readouterr()
    assert "Prompt: 'Hi'" in out
    assert f"note: the weights of {model} are random (load format dummy): the text is gibberish\n" in err


def test_no_random_weights_note_for_a_checkpoint_s_weights(tmp_path: Path) -> None:
    args = EngineArgs(model=str(checkpoint_dir(tmp_path)), max_model_len=32)
    assert random_weights_note(args, args.create_engine_config()) is None


def run_generate(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                 ) -> tuple[str, dict]:  # fmt: skip
    """stderr of `twinbatch generate ARGV`, and the stats of the LLM it ran."""
    made: list[LLM] = []

    class Recorded(LLM):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(twinbatch, "LLM", Recorded)
    main(["generate", *PROMPTS, "--max-tokens", "4", "--max-model-len", "64", *DP2, *argv])
    return capsys.readouterr().err, made[0].get_stats()


def printed_dbo_counts(err: str) -> dict[str, int]:
    (line,) = [line for line in err.splitlines() if line.startswith("DBO: ")]
    done, total = map(
        int, re.match(r"DBO: (\d+) of (\d+) steps microbatched \(summed over 2 DP ranks\)", line).groups()
    )
    others = {reason: int(n) for n, reason in re.findall(r"(\d+) (\w+) \(", line.partition("; ")[2])}
    assert sum(others.values()) + done == total
    return {"microbatched": done, **others} if done else others


LOW = ["--dbo-decode-token-threshold", "2", "--dbo-prefill-token-threshold", "2"]


@pytest.mark.parametrize("thresholds", [[], LOW], ids=["defaults", "low"])
def test_generate_explains_dbo(
    thresholds: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two requests per rank: 2-token decode batches split at thresholds of 2, never at the defaults. The line's
    counts are the engine's, after every rank's last step (each rank counts every step)."""
    err, stats = run_generate(thresholds, monkeypatch, capsys)
    assert printed_dbo_counts(err) == stats["dbo"]
    per_rank = {sum(rank["dbo"].values()) for rank in stats["ranks"].values()}
    assert len(stats["ranks"]) == 2 and len(per_rank) == 1
    if thresholds:
        assert stats["dbo"].get("microbatched", 0) > 0
    else:
        assert "microbatched" not in stats["dbo"] and stats["dbo"]["below_threshold"] > 0
        assert (
            "below_threshold (batches under --dbo-decode-token-threshold 32 / --dbo-prefill-token-threshold 512" in err
        )
        assert f"note: the weights of {BUILTIN_MODEL} are random" in err


def mode(median: float, spread: float = 1.0) -> dict[str, float]:
    return {"median_ms": median, "p10_ms": median - spread / 2, "p90_ms": median + spread / 2}


def report(off: float, on: float, compute: float, comm: float, spread: float = 1.0) -> dict:
    return {"dbo_off": mode(off, spread), "dbo_on": mode(on, spread), "comm_only": mode(comm),
            "ideal_ms": max(compute, comm)}  # fmt: skip


def test_overlap_efficiency_only_where_communication_is_measurable() -> None:
    """A 100 ms step with 30 ms of communication, 75 ms of microbatched compute: DBO can save 25 ms, and saved
    20 of them. The same with 5 ms of communication, or with steps that spread over 30 ms, is not measurable."""
    assert overlap_efficiency(report(100, 80, 75, 30)) == (pytest.approx(0.8), "80%")
    share = MIN_COMM_SHARE / 2
    assert overlap_efficiency(report(100, 97, 75, 100 * share)) == (
        None,
        f"n/a (communication is {share:.0%} of the step)",
    )
    value, text = overlap_efficiency(report(100, 80, 75, 30, spread=30))
    assert value is None and text == "n/a (DBO could save 25.00 ms, within the steps' spread of 30.00 ms)"
    value, text = overlap_efficiency(report(100, 110, 105, 30))
    assert value is None and "more compute than there is communication to hide" in text
