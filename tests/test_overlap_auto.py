"""`--overlap auto` (core/overlap_tuner.py): the tuner's choices from given step times, and whole engines whose DP
ranks agree on a mode from injected per-rank costs (TWINBATCH_AUTO_COSTS) or real timings, with the tokens of one
process."""

import dataclasses
from pathlib import Path

import pytest
from helpers import DP_MAX_TOKENS, DP_PROMPTS, greedy, metrics, post
from openai_server import launch_server

from twinbatch import LLM, SamplingParams
from twinbatch.config import ParallelConfig
from twinbatch.core import overlap_tuner
from twinbatch.core.dp_sync import StepSync
from twinbatch.core.overlap_tuner import TRIALS, OverlapTuner
from twinbatch.core.step_plan import StepPlanner, auto_tuner
from twinbatch.entrypoints.cli import final_dbo_counts

DECODE = ("decode", 64)
CANDIDATES = ["off", "dbo", "sbo2"]
PROMPTS = ["The capital of France is", "Mixture of experts models route each token", "Hello"]


def measure(tuner: OverlapTuner, shape: tuple[str, int], costs: dict[str, float], steps: int) -> list[str]:
    """Runs `steps` steps of one shape whose modes take `costs` ms; returns the mode of each step."""
    ran = []
    for _ in range(steps):
        label, _ = tuner.choose(shape)
        tuner.record(shape, label, label, costs[label])
        ran.append(label)
    return ran


def test_keeps_the_cheapest_mode_of_each_shape() -> None:
    tuner = OverlapTuner(CANDIDATES)
    trials = len(CANDIDATES) * (TRIALS + 1)
    assert measure(tuner, DECODE, {"off": 10, "dbo": 14, "sbo2": 7}, trials)[:3] == CANDIDATES  # in turn
    assert tuner.choose(DECODE) == ("sbo2", "auto_fastest")
    measure(tuner, ("prefill", 4096), {"off": 100, "dbo": 80, "sbo2": 120}, trials)
    assert tuner.choose(("prefill", 4096)) == ("dbo", "auto_fastest")
    assert tuner.choose(DECODE) == ("sbo2", "auto_fastest")  # each shape its own


def test_keeps_off_unless_a_mode_beats_it_by_the_margin() -> None:
    tuner = OverlapTuner(CANDIDATES)
    measure(tuner, DECODE, {"off": 10, "dbo": 9.9, "sbo2": 10.5}, len(CANDIDATES) * (TRIALS + 1))
    assert tuner.choose(DECODE) == ("off", "auto_fastest")


def test_leaves_a_mode_that_became_slower(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept mode's steps drift above what it measured: the shape is measured again, and another mode kept."""
    tuner = OverlapTuner(CANDIDATES)
    measure(tuner, DECODE, {"off": 10, "dbo": 14, "sbo2": 7}, len(CANDIDATES) * (TRIALS + 1))
    ran = measure(tuner, DECODE, {"off": 10, "dbo": 14, "sbo2": 13}, overlap_tuner.RECENT + 3 * (TRIALS + 1))
    assert ran[: overlap_tuner.RECENT] == ["sbo2"] * overlap_tuner.RECENT and "off" in ran and "dbo" in ran
    assert tuner.choose(DECODE) == ("off", "auto_fastest")
    monkeypatch.setattr(overlap_tuner, "RECHECK_STEPS", 5)  # and from time to time, without drift
    assert "dbo" in measure(tuner, DECODE, {"off": 10, "dbo": 14, "sbo2": 13}, 10)


def test_drops_a_mode_the_ranks_cannot_run() -> None:
    """DBO asked for but refused (a rank's batch cannot be split) runs unsplit; after a few refusals the shape
    stops asking for it."""
    tuner = OverlapTuner(CANDIDATES)
    costs = {"off": 10, "sbo2": 12}
    for _ in range(30):
        label, _ = tuner.choose(DECODE)
        ran = "off" if label == "dbo" else label
        tuner.record(DECODE, label, ran, costs[ran])
    assert tuner.choose(DECODE) == ("off", "auto_fastest")
    assert "dbo" not in tuner.shapes[DECODE].candidates


def auto_llm(model: Path, **kwargs: object) -> LLM:
    return LLM(str(model), max_model_len=128, data_parallel_size=2, enable_expert_parallel=True,
               all2all_backend="all2all", overlap="auto", **kwargs)  # fmt: skip


def test_planner_keys_differ_where_ranks_would_plan_differently() -> None:
    """The key each rank sends in the DP sync: equal for equal options and equal measurements, different once two
    tuners were told different times, or where the options differ; the plan raises when the synced keys differ."""
    auto = ParallelConfig(overlap="auto", data_parallel_size=2, enable_expert_parallel=True)
    a, b = StepPlanner(auto, tuner=auto_tuner(auto)), StepPlanner(auto, tuner=auto_tuner(auto))
    for tuner in (a.tuner, b.tuner):
        measure(tuner, DECODE, {"off": 10, "dbo": 14, "sbo2": 7}, 4)
    assert a.key() == b.key()
    measure(a.tuner, DECODE, {"off": 10, "dbo": 14, "sbo2": 7}, 1)
    measure(b.tuner, DECODE, {"off": 10, "dbo": 15, "sbo2": 7}, 1)
    assert a.key() != b.key()
    sbo = dataclasses.replace(auto, overlap="sbo")
    assert StepPlanner(sbo).key() != StepPlanner(dataclasses.replace(sbo, sbo_rounds=4)).key()
    sync = StepSync([4, 4], [True] * 2, [True] * 2, [8, 8], False, [0, 0], [a.key(), b.key()])
    with pytest.raises(RuntimeError, match=r"would plan this step differently: launch all with the same --overlap"):
        a.plan(None, None, sync)


def test_ranks_agree_on_the_slowest_ranks_times(dsv2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank alone would keep another mode (rank 0: off, rank 1: dbo); by the slowest rank's times SBO is the
    cheapest, and both ranks run it, with the tokens of one process."""
    monkeypatch.setenv("TWINBATCH_AUTO_COSTS", "off=10,dbo=30,sbo2=12|off=30,dbo=10,sbo2=12")
    expected = greedy(LLM(str(dsv2_dir), max_model_len=128), DP_PROMPTS, DP_MAX_TOKENS)
    llm = auto_llm(dsv2_dir)
    try:
        assert greedy(llm, DP_PROMPTS, DP_MAX_TOKENS) == expected
        final_dbo_counts(llm)  # until both ranks' reports of their last step arrived
        stats = llm.get_stats()
        # the same mode on every step of both ranks (why DBO was refused is each rank's own view)
        ranks = [{mode: sum(why.values()) for mode, why in r["overlap"].items()} for r in stats["ranks"].values()]
        assert ranks[0] == ranks[1], stats["ranks"]
        assert stats["overlap"]["sbo2"]["auto_fastest"] > 0, stats["overlap"]
        assert "auto_fastest" not in stats["overlap"].get("off", {}) | stats["overlap"].get("dbo", {})
    finally:
        llm.shutdown()


def test_real_timings_through_llm_and_the_server() -> None:
    """No injected costs: the modes are timed on the steps themselves. The built-in model through LLM gives the
    tokens of overlap off, and the server gives LLM's text and counts the steps in /metrics by mode and reason."""
    flags = {
        "max_model_len": 256,
        "data_parallel_size": 2,
        "enable_expert_parallel": True,
        "all2all_backend": "all2all",
    }
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    texts = {}
    for overlap in ("off", "auto"):
        llm = LLM(overlap=overlap, **flags)
        try:
            texts[overlap] = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        finally:
            llm.shutdown()
    assert texts["auto"] == texts["off"]
    cli = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in flags.items()]
    with launch_server(*cli, "--overlap", "auto") as url:
        body = {"prompt": PROMPTS, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        assert [c["text"] for c in post(url, "/v1/completions", body)["choices"]] == texts["off"]
        steps = {labels: v for (name, labels), v in metrics(url).items() if name == "twinbatch:overlap_steps_total"}
        assert any(dict(labels)["reason"] == "auto_trial" and v > 0 for labels, v in steps.items()), steps
