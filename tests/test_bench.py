"""`twinbatch bench step` runs on CPU (gloo) and reports DBO off vs on; the figures are not asserted."""

import json
import subprocess
import sys


def test_bench_step_reports_dbo_off_and_on() -> None:
    args = "--data-parallel-size 2 --tokens-per-rank 16 --context-len 32 --num-steps 2 --warmup 1 --all2all-backend"
    args += " all2all"
    cmd = [sys.executable, "-m", "twinbatch", "bench", "step", *args.split(), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["setup"] | {"dp": 2, "backend": "all2all", "ubatches": 2} == report["setup"]
    for mode in ("dbo_off", "dbo_on", "compute_only", "compute_only_dbo", "comm_only"):
        assert 0 < report[mode]["p10_ms"] <= report[mode]["median_ms"] <= report[mode]["p90_ms"]
        assert report[mode]["tokens_per_s"] > 0
    assert report["speedup"] > 0
    assert report["ideal_ms"] == max(report["compute_only_dbo"]["median_ms"], report["comm_only"]["median_ms"])
    assert "overlap_efficiency" in report
