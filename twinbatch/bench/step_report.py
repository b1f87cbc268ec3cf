"""What `twinbatch bench step` prints and draws from a report: the table, the overlap efficiency where it can be
measured, and the sweep chart."""

from __future__ import annotations

from typing import Any

# Overlap efficiency is reported only where communication is at least this share of the DBO-off step (and the
# time DBO could save exceeds the steps' spread, see overlap_efficiency): below it, the few milliseconds there are
# to hide are within a step's run-to-run noise, and the ratio swings from near 100% to negative between runs.
MIN_COMM_SHARE = 0.1


def overlap_efficiency(report: dict[str, Any], label: str = "dbo", ideal: float | None = None
                       ) -> tuple[float | None, str]:  # fmt: skip
    """(T_off - T_mode) / (T_off - ideal) of an overlap mode (DBO by default; its ideal from the report unless
    given) and its text, or None and why it is not measurable: communication under MIN_COMM_SHARE of the off
    step, or a possible saving (T_off - ideal) within the spread (p90 - p10) of the off step or the mode's,
    which no difference of their medians can resolve."""
    step, _, comm = report_keys(label)
    off, on, ideal = report["dbo_off"], report[step], report["ideal_ms"] if ideal is None else ideal
    share = report[comm]["median_ms"] / off["median_ms"]
    if share < MIN_COMM_SHARE:
        return None, f"n/a (communication is {share:.0%} of the step)"
    saving, spread = off["median_ms"] - ideal, max(m["p90_ms"] - m["p10_ms"] for m in (off, on))
    if saving <= 0:
        return None, f"n/a ({mode_name(label)} adds more compute than there is communication to hide)"
    if saving <= spread:
        return None, f"n/a ({mode_name(label)} could save {saving:.2f} ms, within the steps' spread of {spread:.2f} ms)"
    efficiency = (off["median_ms"] - on["median_ms"]) / saving
    return efficiency, f"{efficiency:.0%}"


def mode_summary(report: dict[str, Any], label: str) -> dict[str, float | None]:
    """A mode against off: its speed-up, its ideal max(compute, communication) and overlap efficiency."""
    step, compute, comm = (report[key]["median_ms"] for key in report_keys(label))
    off = report["dbo_off"]["median_ms"]
    summary = {"speedup": off / step, "ideal_ms": max(compute, comm), "comm_share": comm / off}
    return summary | {"overlap_efficiency": overlap_efficiency(report, label, summary["ideal_ms"])[0]}


def table(report: dict[str, Any]) -> str:
    setup = report["setup"]
    overrides = f" with overrides {setup['hf_overrides']}" if setup["hf_overrides"] else ""
    lines = [f"model: {setup['model']}{overrides} ({setup['load_format']} weights)",
             f"setup: {setup}",
             f"{'mode':16} {'median ms':>10} {'p10 ms':>9} {'p90 ms':>9} {'host ms':>9} {'tok/s':>10}"]  # fmt: skip
    steps = ["single", *(k for label in LABELS for k in (report_keys(label)[0], report_keys(label)[0] + "_eager")),
             "auto"]  # fmt: skip
    for name in steps + [k for label in LABELS for k in report_keys(label)[1:] if k]:
        if name in report:
            r = report[name]
            ms = f"{r['median_ms']:10.2f} {r['p10_ms']:9.2f} {r['p90_ms']:9.2f} {r['host_median_ms']:9.2f}"
            lines.append(f"{name:16} {ms} {r['tokens_per_s']:10.0f}")
    if "auto" in report:
        lines.append(f"auto kept {report['auto']['kept']} (off / auto: "
                     f"{report['dbo_off']['median_ms'] / report['auto']['median_ms']:.3f}x)")  # fmt: skip
    for label, m in report.get("modes", {}).items():
        efficiency = overlap_efficiency(report, label, m["ideal_ms"])[1]
        lines.append(f"{mode_name(label)} speedup (off / {label}): {m['speedup']:.3f}x; ideal max(compute, comm) "
                     f"{m['ideal_ms']:.2f} ms; overlap efficiency {efficiency}")  # fmt: skip
    if "hbm_roofline_ms" in report:
        lines.append(f"HBM roofline {report['hbm_roofline_ms']:.2f} ms; compute only (DBO off) is "
                     f"{report['compute_only_vs_roofline']:.2f}x of it")  # fmt: skip
    return "\n".join(lines)


def plot_sweep(reports: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--sweep draws its chart with matplotlib: pip install matplotlib") from None
    tokens = [r["setup"]["tokens_per_rank"] for r in reports]
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in [label for label in LABELS if report_keys(label)[0] in reports[0]]:
        ax.plot(tokens, [r[report_keys(label)[0]]["median_ms"] for r in reports], marker="o", label=label)
    if "auto" in reports[0]:
        ax.plot(tokens, [r["auto"]["median_ms"] for r in reports], marker="x", linestyle=":", label="auto")
    for label in reports[0].get("modes", {}):
        ideal = [r["modes"][label]["ideal_ms"] for r in reports]
        ax.plot(tokens, ideal, linestyle="--", label=f"{label} ideal max(compute, comm)")
    ax.set(xscale="log", xlabel="tokens per rank", ylabel="median step time (ms)", title=_title(reports[0]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


LABELS = ("off", "dbo", "sbo2", "sbo4")  # the modes bench step measures (bench/step.py bench_modes), in order


def mode_name(label: str) -> str:
    return (
        "DBO" if label == "dbo" else f"SBO in {label.removeprefix('sbo')} rounds" if label.startswith("sbo") else label
    )


def report_keys(label: str) -> tuple[str, str, str]:
    """(step, compute only, communication only) keys of a mode in the report; DBO's keep their first names."""
    if label == "off":
        return "dbo_off", "compute_only", ""
    if label == "dbo":
        return "dbo_on", "compute_only_dbo", "comm_only"
    return label, f"compute_only_{label}", f"comm_only_{label}"


def _title(report: dict[str, Any]) -> str:
    s = report["setup"]
    return f"{s['phase']}, DP={s['dp']} EP={s['dp']}, {s['backend']}, {s['device']}"
