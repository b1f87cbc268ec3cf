"""`twinbatch serve` as a subprocess on a free port, for tests that talk to the real OpenAI-compatible server.

tests/ has no __init__.py, so pytest puts it on sys.path and this imports as a top-level module.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from twinbatch.engine.launcher import free_port
from twinbatch.entrypoints.cli import make_parser

REPO = Path(__file__).resolve().parents[1]
# The built-in model in two worker processes, with expert parallelism and DBO on every step that can take it.
BUILTIN_DP2_FLAGS = ("--max-model-len", "256", "--data-parallel-size", "2", "--enable-expert-parallel",
                     "--all2all-backend", "all2all", "--enable-dbo", "--dbo-decode-token-threshold", "2",
                     "--dbo-prefill-token-threshold", "2")  # fmt: skip


def server_missing() -> str | None:
    """Why `twinbatch serve` cannot run in this checkout, or None."""
    if not (REPO / "twinbatch" / "entrypoints" / "openai").is_dir():
        return "twinbatch/entrypoints/openai (the OpenAI-compatible server) is not in this checkout yet"
    commands = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "serve" not in commands:
        return "the `twinbatch serve` command is not in this checkout yet"
    return None


@contextmanager
def launch_server(*flags: str, startup_timeout: float = 180.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Starts `python -m twinbatch serve` on the built-in model (unless flags say otherwise); yields its base URL
    once GET /v1/models answers; stops it (SIGTERM, then SIGKILL) afterwards."""
    with server_process(*flags, startup_timeout=startup_timeout, env=env) as server:
        yield server.url


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log: IO[str]

    def output(self) -> str:
        """What the server printed so far (its log: tracebacks go there, not to clients). pread leaves the file
        offset, which the server's writes share, where it is."""
        fd = self.log.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def worker_pids(self) -> list[int]:
        """Its DP rank processes (spawned children)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the server did not exit within {timeout} s") from None


def gauges(url: str) -> dict[tuple[str, str], float]:
    """The engine gauges of /metrics: (name, engine) -> value."""
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    text = httpx.get(url + "/metrics", timeout=5).text
    return {(s.name, s.labels["engine"]): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in names}  # fmt: skip


@contextmanager
def server_process(
    *flags: str, startup_timeout: float = 180.0, env: dict[str, str] | None = None
) -> Iterator[ServerProcess]:
    """launch_server's server, with its process (for tests that watch it exit); `env` adds to the environment."""
    if reason := server_missing():
        pytest.skip(reason)
    port = free_port()
    cmd = [sys.executable, "-m", "twinbatch", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])} | (env or {})
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty server never blocks on a full pipe
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_ready(proc, url, startup_timeout, log)
            yield ServerProcess(url, proc, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: IO[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"`twinbatch serve` exited with {proc.returncode}:\n{log.read()[-5000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"`twinbatch serve` did not answer GET {url}/v1/models within {timeout} s")
