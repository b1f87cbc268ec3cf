"""`twinbatch bench step` runs on CPU (gloo) and reports DBO off vs on; the figures are not asserted, only how
they are reported."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from twinbatch.bench.step_report import overlap_efficiency


def test_bench_step_reports_dbo_off_and_on() -> None:
    args = "--data-parallel-size 2 --tokens-per-rank 16 --context-len 32 --num-steps 2 --warmup 1 --all2all-backend"
    args += " all2all"
    cmd = [sys.executable, "-m", "twinbatch", "bench", "step", *args.split(), "--json"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(run.stdout.strip().splitlines()[-1], parse_constant=reject_nan)
    expected = {"model": "twinbatch/tiny-deepseek-v2", "load_format": "dummy", "dp": 2, "backend": "all2all"}
    assert report["setup"] | expected | {"ubatches": 2} == report["setup"]
    assert "dbo_comm_sms" not in report["setup"]  # an SM reservation exists only on CUDA
    assert "16 tokens per rank: 100%" in run.stderr  # rank 0's progress bar
    sbo = [f"{kind}sbo{r}" for r in (2, 4) for kind in ("", "compute_only_", "comm_only_")]
    for mode in ("dbo_off", "dbo_on", "compute_only", "compute_only_dbo", "comm_only", *sbo, "auto"):
        assert 0 < report[mode]["p10_ms"] <= report[mode]["median_ms"] <= report[mode]["p90_ms"]
        assert 0 < report[mode]["host_median_ms"] <= report[mode]["p90_ms"]  # until the step returns, no GPU wait
        assert report[mode]["tokens_per_s"] > 0
    assert report["speedup"] > 0
    assert report["ideal_ms"] == max(report["compute_only_dbo"]["median_ms"], report["comm_only"]["median_ms"])
    assert report["comm_share"] == report["comm_only"]["median_ms"] / report["dbo_off"]["median_ms"]
    assert report["overlap_efficiency"] == overlap_efficiency(report)[0]
    for label in ("sbo2", "sbo4"):  # each mode against off, with its own ideal
        m = report["modes"][label]
        assert m["speedup"] == report["dbo_off"]["median_ms"] / report[label]["median_ms"]
        assert m["ideal_ms"] == max(
            report[f"compute_only_{label}"]["median_ms"], report[f"comm_only_{label}"]["median_ms"]
        )
        assert m["overlap_efficiency"] == overlap_efficiency(report, label, m["ideal_ms"])[0]
    assert report["auto"]["kept"] in ("off", "dbo", "sbo2", "sbo4")


def reject_nan(name: str) -> None:
    raise ValueError(f"{name} in the JSON report")


def test_bench_step_profile_writes_traces_and_kernel_tables(tmp_path: Path) -> None:
    """--profile: a Perfetto trace and an operator table of one step in each mode, per rank (on GPU the table
    lists kernels, graph-replayed ones included)."""
    args = "--data-parallel-size 2 --tokens-per-rank 8 --context-len 16 --num-steps 1 --warmup 0 --all2all-backend"
    args += f" all2all --profile {tmp_path} --disable-tqdm"
    cmd = [sys.executable, "-m", "twinbatch", "bench", "step", *args.split()]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    out = run.stdout
    assert "tokens per rank" not in run.stderr
    assert out.startswith("model: twinbatch/tiny-deepseek-v2 (dummy weights)\nsetup: ")
    for name in ("dbo_off", "dbo_on", "sbo2", "sbo4"):
        for rank in (0, 1):
            trace = json.loads((tmp_path / f"{name}_rank{rank}.json").read_text())
            ops = {e.get("name") for e in trace["traceEvents"]}
            assert "aten::mm" in ops or "aten::addmm" in ops or "aten::linear" in ops
            assert (tmp_path / f"{name}_rank{rank}.txt").read_text().startswith(f"{name}_rank{rank}: CPU operators")
            threads = {e.get("tid") for e in trace["traceEvents"] if str(e.get("name")).startswith("aten::")}
            if name == "dbo_on" and "profile_all_threads" in torch.profiler._ExperimentalConfig.__init__.__doc__:
                assert len(threads) >= 3, "the microbatch threads' operators are in the trace"
        assert f"{name}_rank0: CPU operators" in out  # rank 0's tables are printed
    assert "dbo_off_rank1" not in out


def test_bench_throughput_reports_each_run_and_the_median() -> None:
    args = "--num-prompts 4 --input-len 6 --output-len 5 --num-iters 2 --max-model-len 64 --async-scheduling --json"
    run = subprocess.run([sys.executable, "-m", "twinbatch", "bench", "throughput", *args.split()],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    report = json.loads(run.stdout.strip().splitlines()[-1], parse_constant=reject_nan)
    assert report["setup"]["async_scheduling"] is True and report["setup"]["num_prompts"] == 4
    assert (
        len(report["runs_s"]) == 2
        and report["median_s"]
        == sorted(report["runs_s"])[0] + (sorted(report["runs_s"])[1] - sorted(report["runs_s"])[0]) / 2
    )
    assert report["output_tokens_per_s"] == 4 * 5 / report["median_s"]


def test_overlap_summary_of_a_step_s_kernels() -> None:
    """Compute kernels [0, 10], [5, 20] and [30, 40] us (a union of 30 us, overlaps merged) and one collective
    [15, 35] us, of which 10 us ran beside compute."""
    from twinbatch.bench.profile import overlap_summary

    kernels = [("gemm", 0.0, 10.0), ("ncclDevKernel_SendRecv", 15.0, 35.0), ("triton_poi", 5.0, 20.0),
               ("gemm", 30.0, 40.0)]  # fmt: skip
    assert overlap_summary(kernels) == (
        "span 0.04 ms: compute kernels running 0.03 ms, none 0.01 ms; collectives 0.02 ms, 0.01 ms of it beside compute"
    )
    kernels = [(name, start * 1e3, end * 1e3) for name, start, end in kernels]  # the same in ms
    assert overlap_summary(kernels).startswith("span 40.00 ms: compute kernels running 30.00 ms, none 10.00 ms;")
    assert overlap_summary(kernels).endswith("collectives 20.00 ms, 10.00 ms of it beside compute")
