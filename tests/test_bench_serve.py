"""`twinbatch bench serve`: the metric arithmetic against hand-computed values, and whole runs against servers.

The fake server below is a minimal OpenAI streaming server (FastAPI + uvicorn, in a thread) that sends its
chunks at known times, so TTFT, ITL, TPOT and E2EL have known values up to scheduling noise, and that records
what it was sent (payloads, requests in flight, arrival times).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai_server import launch_server

from twinbatch.bench.serve import arrival_times, random_requests
from twinbatch.bench.serve_metrics import (
    RequestFuncOutput,
    calculate_metrics,
    format_table,
    parse_stream,
    percentile,
    request_tpot,
)
from twinbatch.engine.launcher import free_port
from twinbatch.entrypoints.cli import main


def content(text: str) -> dict[str, Any]:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}


# ---------------------------------------------------------------- metric arithmetic, by hand


def test_parse_stream_times_content_chunks_and_takes_usage() -> None:
    events = [
        (10.25, content("a")),
        (10.35, content("bc")),  # two tokens in one chunk: one ITL gap, counted by usage
        (10.60, {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}),  # non-empty choices: counts
        (10.70, {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}),  # no token: not timed
    ]
    out = parse_stream(10.0, events, prompt_len=5)
    assert out.success and out.error == ""
    assert out.ttft == pytest.approx(0.25)
    assert out.itl == pytest.approx([0.10, 0.25])
    assert out.latency == pytest.approx(0.60)  # E2EL ends at the last content chunk, not the usage chunk
    assert (out.output_tokens, out.prompt_len, out.generated_text) == (4, 7, "abc")
    assert request_tpot(out) == pytest.approx((0.60 - 0.25) / 3)


def test_parse_stream_without_usage_counts_chunks() -> None:
    out = parse_stream(0.0, [(0.5, content("x")), (0.7, content("y")), (1.0, content("z"))], prompt_len=5)
    assert (out.output_tokens, out.prompt_len) == (3, 5)
    assert request_tpot(out) == pytest.approx((1.0 - 0.5) / 2)


def test_parse_stream_failures() -> None:
    only_usage = parse_stream(0.0, [(0.1, {"choices": [], "usage": {"completion_tokens": 0}})], prompt_len=3)
    assert not only_usage.success and "first token" in only_usage.error
    error = parse_stream(0.0, [(0.1, content("a")), (0.2, {"error": {"message": "boom"}})], prompt_len=3)
    assert not error.success and "boom" in error.error
    one_token = parse_stream(0.0, [(0.1, content("a"))], prompt_len=3)
    assert one_token.success and request_tpot(one_token) is None


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0, 3.0, 4.0], 99) == pytest.approx(3.97)  # h = 3 * 0.99 = 2.97
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99.9) == 5.0
    assert percentile([], 99) == 0.0


def test_calculate_metrics_by_hand() -> None:
    outputs = [
        RequestFuncOutput(success=True, prompt_len=10, output_tokens=4, ttft=0.2, itl=[0.1, 0.1, 0.1], latency=0.5),
        RequestFuncOutput(success=True, prompt_len=20, output_tokens=1, ttft=0.4, itl=[], latency=0.4),
        RequestFuncOutput(success=False, prompt_len=30, error="HTTP 500"),
    ]
    m = calculate_metrics(outputs, duration=2.0, percentiles=[50, 99])
    assert (m.completed, m.failed, m.total_input, m.total_output) == (2, 1, 30, 5)
    assert (m.request_throughput, m.output_throughput, m.total_token_throughput) == (1.0, 2.5, 17.5)
    ms = m.latency_ms
    assert ms["ttft"] == pytest.approx({"mean": 300, "median": 300, "std": 100, "p50": 300, "p99": 398})
    assert ms["tpot"] == pytest.approx({"mean": 100, "median": 100, "std": 0, "p50": 100, "p99": 100})  # one request
    assert ms["itl"] == pytest.approx({"mean": 100, "median": 100, "std": 0, "p50": 100, "p99": 100})
    assert ms["e2el"] == pytest.approx({"mean": 450, "median": 450, "std": 50, "p50": 450, "p99": 499})
    table = format_table(m, ["ttft", "e2el"], max_concurrency=4, request_rate=math.inf)
    assert "Serving Benchmark Result" in table and "Inter-token Latency" not in table
    for label, value in [("Successful requests:", "2"), ("Failed requests:", "1"), ("Total input tokens:", "30"),
                         ("Output token throughput (tok/s):", "2.50"), ("Maximum request concurrency:", "4"),
                         ("P99 TTFT (ms):", "398.00"), ("Median E2EL (ms):", "450.00")]:  # fmt: skip
        assert re.search(rf"^{re.escape(label)} +{re.escape(value)} *$", table, re.M), label


def test_calculate_metrics_all_failed_gives_zeros() -> None:
    m = calculate_metrics([RequestFuncOutput(error="x")], duration=1.0, percentiles=[99])
    assert (m.completed, m.failed, m.request_throughput) == (0, 1, 0.0)
    assert m.latency_ms["ttft"]["p99"] == 0.0


def test_arrival_times() -> None:
    assert arrival_times(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]
    assert arrival_times(4, 4.0, math.inf, random.Random(0)) == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for burstiness, cv in [(1.0, 1.0), (4.0, 0.5)]:  # gamma(k) gaps: coefficient of variation 1 / sqrt(k)
        times = arrival_times(4000, 10.0, burstiness, random.Random(1))
        gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
        assert times[-1] == pytest.approx(400.0)  # rescaled: the last request goes at n / rate
        assert min(gaps) > 0
        assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, abs=0.05)


def test_random_requests() -> None:
    fixed = random_requests(5, 16, 8, 0.0, 50, random.Random(0))
    assert [(len(r.prompt), r.prompt_len, r.expected_output_len) for r in fixed] == [(16, 16, 8)] * 5
    assert all(0 <= t < 50 for r in fixed for t in r.prompt)
    assert fixed == random_requests(5, 16, 8, 0.0, 50, random.Random(0))
    varied = random_requests(200, 20, 10, 0.5, 50, random.Random(0))
    assert {r.prompt_len for r in varied} == set(range(10, 31))
    assert {r.expected_output_len for r in varied} == set(range(5, 16))


# ---------------------------------------------------------------- end to end, against a fake server


def fake_openai_app(ttft: float, itl: float, vocab_size: int) -> FastAPI:
    """/v1/completions streams max_tokens one-token chunks: the first after `ttft`, the others `itl` apart,
    then a usage chunk. Prompts of odd length get HTTP 400 (a failure the test can predict)."""
    app = FastAPI()
    log: dict[str, Any] = {"payloads": [], "arrivals": [], "in_flight": 0, "max_in_flight": 0}
    app.state.log = log

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return {"tokenizer_class": "Fake", "vocab_size": vocab_size}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        log["payloads"].append(body)
        log["arrivals"].append(time.perf_counter())
        if len(body["prompt"]) % 2:
            return JSONResponse({"error": {"message": "odd prompt"}}, status_code=400)
        return StreamingResponse(stream(body), media_type="text/event-stream")

    async def stream(body: dict) -> AsyncIterator[str]:
        log["in_flight"] += 1
        log["max_in_flight"] = max(log["max_in_flight"], log["in_flight"])
        try:
            await asyncio.sleep(ttft)
            for i in range(body["max_tokens"]):
                if i:
                    await asyncio.sleep(itl)
                yield f"data: {json.dumps(content(f' t{i}'))}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            log["in_flight"] -= 1

    return app


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def bench(base_url: str, result: Path, *flags: str) -> dict[str, Any]:
    main(["bench", "serve", "--base-url", base_url, "--disable-tqdm", "--save-result",
          "--result-filename", str(result), *flags])  # fmt: skip
    return json.loads(result.read_text())


def test_bench_serve_times_a_fake_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ttft, itl, out_len = 0.2, 0.05, 4
    app = fake_openai_app(ttft=ttft, itl=itl, vocab_size=50)
    with serve_in_thread(app) as url:
        flags = "--num-prompts 8 --max-concurrency 4 --random-input-len 6 --ignore-eos --metric-percentiles 50,99"
        r = bench(url, tmp_path / "r.json", *flags.split(), "--random-output-len", str(out_len))
    log = app.state.log
    assert (r["completed"], r["failed"], r["model_id"], r["random_vocab_size"]) == (8, 0, "fake-model", 50)
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (8 * 6, 8 * out_len)
    assert log["max_in_flight"] == 4  # --max-concurrency held, and reached
    for p in log["payloads"]:
        assert p["model"] == "fake-model" and p["max_tokens"] == out_len and p["ignore_eos"] is True
        assert p["stream"] is True and p["stream_options"] == {"include_usage": True}
        assert len(p["prompt"]) == 6 and all(isinstance(t, int) and 0 <= t < 50 for t in p["prompt"])
    # the server's schedule, within scheduling noise (never faster than the server's sleeps); on the loaded
    # 2-core CI machine one first token has come 0.23 s late
    assert all(ttft <= t < ttft + 0.4 for t in r["ttfts"])
    assert itl * 0.8 <= r["median_itl_ms"] / 1e3 < itl + 0.05
    assert itl <= r["mean_tpot_ms"] / 1e3 < itl + 0.05
    assert all(e >= ttft + (out_len - 1) * itl for e in r["e2els"])
    for t, gaps, e in zip(r["ttfts"], r["itls"], r["e2els"], strict=True):
        assert len(gaps) == out_len - 1 and t + sum(gaps) == pytest.approx(e)
    assert r["duration"] >= 2 * (ttft + (out_len - 1) * itl)  # two waves of four
    assert r["request_throughput"] == pytest.approx(8 / r["duration"])
    assert r["p50_ttft_ms"] == pytest.approx(r["median_ttft_ms"]) and "p99_e2el_ms" in r
    table = capsys.readouterr().out
    assert re.search(r"^Successful requests: +8 *$", table, re.M) and "P99 ITL (ms):" in table


def test_bench_serve_counts_failures_and_paces_arrivals(tmp_path: Path) -> None:
    app = fake_openai_app(ttft=0.0, itl=0.0, vocab_size=50)
    n, rate = 12, 20.0
    with serve_in_thread(app) as url:
        r = bench(url, tmp_path / "r.json", "--num-prompts", str(n), "--request-rate", str(rate),
                  "--random-input-len", "10", "--random-range-ratio", "0.5", "--random-output-len", "2",
                  "--seed", "3")  # fmt: skip
    odd = sum(len(p["prompt"]) % 2 for p in app.state.log["payloads"])
    assert 0 < odd < n  # the seed gives both kinds
    assert (r["completed"], r["failed"]) == (n - odd, odd)
    assert sum(bool(e) for e in r["errors"]) == odd and all("HTTP 400" in e for e in r["errors"] if e)
    served = [p for p in app.state.log["payloads"] if len(p["prompt"]) % 2 == 0]
    assert r["total_output_tokens"] == sum(p["max_tokens"] for p in served)  # lengths vary with the ratio too
    assert r["total_input_tokens"] == sum(len(p["prompt"]) for p in served)
    arrivals = app.state.log["arrivals"]
    assert r["duration"] >= n / rate  # the last request is sent at n / rate
    assert max(arrivals) - min(arrivals) <= n / rate + 0.5  # scheduling noise: 0.18 s seen on the CI machine


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--num-prompts 1", "pass --model"),  # nothing listens on that port
        ("--max-concurrency 0", "at least 1"),
        ("--request-rate 0", "must be positive"),
        ("--percentile-metrics ttft,foo", "unknown"),
    ],
)
def test_bench_serve_bad_setup_says_what_to_change(flags: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        main(["bench", "serve", "--base-url", f"http://127.0.0.1:{free_port()}", *flags.split()])


# ---------------------------------------------------------------- end to end, against `twinbatch serve`


def test_bench_serve_against_twinbatch_serve(tmp_path: Path) -> None:
    flags = "--num-prompts 16 --max-concurrency 4 --random-input-len 32 --random-output-len 8 --ignore-eos"
    with launch_server("--max-model-len", "256") as url:
        r = bench(url, tmp_path / "r.json", *flags.split())
    assert (r["completed"], r["failed"]) == (16, 0), r["errors"]
    assert r["output_lens"] == [8] * 16 and r["total_output_tokens"] == 128  # ignore_eos: every request runs out
    assert r["input_lens"] == [32] * 16 and r["total_input_tokens"] == 16 * 32  # the server's usage.prompt_tokens
    assert all(0 < t <= e for t, e in zip(r["ttfts"], r["e2els"], strict=True))
    for t, gaps, e in zip(r["ttfts"], r["itls"], r["e2els"], strict=True):
        assert 1 <= len(gaps) <= 7 and t + sum(gaps) == pytest.approx(e)  # at most one chunk per token
    assert r["mean_tpot_ms"] > 0 and r["output_throughput"] == pytest.approx(128 / r["duration"])
