"""The simulator's report: `deepflow bench serve`'s numbers (`bench.report.Summary`) with the cluster's."""

from __future__ import annotations

from deepflow.bench.report import render_report, summary_rows
from deepflow.sim.simulation import SimResult

__all__ = ["format_report"]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_report(result: SimResult) -> str:
    cfg, s = result.config, result.summary
    profile = cfg.profile
    preemptions = sum(t["preemptions"] for t in result.per_te)
    busy = [t["busy_fraction"] for t in result.per_te]
    rows = [
        ("Cluster", f"{cfg.num_tes} TEs, policy {cfg.policy}"),
        ("Cost model", f"{profile.kind} profile {profile.model.name}" if profile else "-"),
        ("Workload", result.workload),
        ("Simulated (s)", _fmt(result.simulated_s)),
        (
            "Wall time (s)",
            f"{_fmt(result.wall_s)} ({result.num_steps:,} TE steps, {result.num_events:,} events)",
        ),
        *summary_rows(s),
        ("Preemptions", f"{preemptions:,}"),
        ("TE busy (min/mean/max)", f"{min(busy):.2f} / {sum(busy) / len(busy):.2f} / {max(busy):.2f}"),
        ("Routing", ", ".join(f"{k} {v}" for k, v in result.reasons.items()) or "-"),
    ]
    if cfg.itl_sample_every > 1:
        rows.append(("ITL sample", f"1 request in {cfg.itl_sample_every}"))
    return render_report(" deepflow sim run ", rows, s)
