"""Draws every chart in docs/img/ from the JSON in docs/results/.

    python scripts/plot_results.py           # redraw the charts (needs matplotlib: pip install matplotlib)
    python scripts/plot_results.py --check   # only load and validate the JSON each chart plots

A chart is a PNG name, the results file it plots and the function that draws it (CHARTS). A step sweep's JSON
holds the `bench step --json` report of each point under "reports" (a bare list of reports also loads).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS, IMG = ROOT / "docs" / "results", ROOT / "docs" / "img"


class BadResults(ValueError):
    """A results file that a chart cannot plot; the message names the file and what is wrong."""


def load(name: str) -> Any:
    path = RESULTS / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadResults(f"{path}: {e}") from None


def sweep_reports(name: str) -> list[dict[str, Any]]:
    """The points of a `bench step --sweep` run, checked: each with tokens per rank, the DBO-off and DBO-on
    medians and the ideal, in increasing tokens per rank."""
    data = load(name)
    reports = data.get("reports") if isinstance(data, dict) else data
    if not isinstance(reports, list) or not reports:
        raise BadResults(f"{name}: expected a non-empty list of reports under 'reports'")
    for i, r in enumerate(reports):
        where = f"{name}: report {i}"
        for path in (("setup", "tokens_per_rank"), ("dbo_off", "median_ms"), ("dbo_on", "median_ms"), ("ideal_ms",)):
            value: Any = r
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise BadResults(f"{where}: {'.'.join(path)} is {value!r}, expected a positive number")
        for key in ("phase", "dp", "backend", "device"):
            if key not in r["setup"]:
                raise BadResults(f"{where}: setup has no {key!r}")
    tokens = [r["setup"]["tokens_per_rank"] for r in reports]
    if tokens != sorted(set(tokens)):
        raise BadResults(f"{name}: tokens per rank {tokens} are not increasing")
    return reports


def draw_sweep(plt: Any, reports: list[dict[str, Any]], png: Path) -> None:
    """DBO off, DBO on and the ideal max(compute DBO, comm) against tokens per rank (as `bench step --sweep`)."""
    tokens = [r["setup"]["tokens_per_rank"] for r in reports]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("dbo_off", "DBO off"), ("dbo_on", "DBO on")):
        ax.plot(tokens, [r[key]["median_ms"] for r in reports], marker="o", label=label)
    ax.plot(tokens, [r["ideal_ms"] for r in reports], linestyle="--", label="ideal max(compute, comm)")
    s = reports[0]["setup"]
    title = f"{s['phase']}, DP={s['dp']} EP={s['dp']}, {s['backend']}, {s['device']}"
    ax.set(xscale="log", xlabel="tokens per rank", ylabel="median step time (ms)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# PNG in docs/img -> (its results file in docs/results, loader that validates it, drawing function)
CHARTS: dict[str, tuple[str, Callable[[str], Any], Callable[[Any, Any, Path], None]]] = {
    "sweep_decode_2gpu.png": ("2026-11-28_step_dp2_decode_sweep_nvlink.json", sweep_reports, draw_sweep),
}


def check() -> list[str]:
    """Every chart's JSON loaded and validated, and every PNG in docs/img drawn by a chart -> the problems."""
    problems = []
    for png, (name, loader, _) in CHARTS.items():
        try:
            loader(name)
        except BadResults as e:
            problems.append(f"{png}: {e}")
    problems += [f"{p.name}: no chart in CHARTS draws it" for p in sorted(IMG.glob("*.png")) if p.name not in CHARTS]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only load and validate the JSON (no matplotlib)")
    args = parser.parse_args()
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems or args.check:
        if not problems:
            print(f"{len(CHARTS)} chart(s): JSON valid")
        return 1 if problems else 0
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("drawing the charts needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    IMG.mkdir(parents=True, exist_ok=True)
    for png, (name, loader, draw) in CHARTS.items():
        draw(plt, loader(name), IMG / png)
        print(f"wrote docs/img/{png} from docs/results/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
