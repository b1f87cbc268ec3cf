"""The package layering (docs/architecture.md): `lint-imports` checks the contracts in pyproject.toml, a layers
contract (each package imports only the ones below it) and an acyclic-siblings one (no import cycles)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_downward_and_form_no_cycle() -> None:
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports is missing: pip install -e '.[dev]' installs import-linter")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, wherever pip installed one
    out = subprocess.run([lint, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout, out.stdout
