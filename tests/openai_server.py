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
from pathlib import Path
from typing import IO

import httpx
import pytest

from twinbatch.engine.launcher import free_port
from twinbatch.entrypoints.cli import make_parser

REPO = Path(__file__).resolve().parents[1]


def server_missing() -> str | None:
    """Why `twinbatch serve` cannot run in this checkout, or None."""
    if not (REPO / "twinbatch" / "entrypoints" / "openai").is_dir():
        return "twinbatch/entrypoints/openai (the OpenAI-compatible server) is not in this checkout yet"
    commands = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    if "serve" not in commands:
        return "the `twinbatch serve` command is not in this checkout yet"
    return None


@contextmanager
def launch_server(*flags: str, startup_timeout: float = 180.0) -> Iterator[str]:
    """Starts `python -m twinbatch serve` on the built-in model (unless flags say otherwise); yields its base URL
    once GET /v1/models answers; stops it (SIGTERM, then SIGKILL) afterwards."""
    if reason := server_missing():
        pytest.skip(reason)
    port = free_port()
    cmd = [sys.executable, "-m", "twinbatch", "serve", "--host", "127.0.0.1", "--port", str(port), *flags]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty server never blocks on a full pipe
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_ready(proc, url, startup_timeout, log)
            yield url
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
