"""The simulator's report: `deepflow bench serve`'s numbers (`bench.report.Summary`) with the cluster's."""

from __future__ import annotations

from deepflow.bench.report import Summary
from deepflow.sim.simulation import SimResult

__all__ = ["format_report"]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_report(result: SimResult) -> str:
    cfg, s = result.config, result.summary
    width = 72
    profile = cfg.profile
    hits = sum(t["prefix_cache_hits"] for t in result.per_te)
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
        ("Successful requests", f"{s.completed} of {s.num_requests}"),
        ("Failed requests", str(s.failed)),
        ("Duration (s)", _fmt(s.duration_s)),
        ("Request throughput (req/s)", _fmt(s.request_throughput)),
        ("Output token throughput (tok/s)", _fmt(s.output_throughput)),
        ("Total token throughput (tok/s)", _fmt(s.total_token_throughput)),
        ("Total input tokens", f"{s.total_input_tokens:,}"),
        ("Total output tokens", f"{s.total_output_tokens:,}"),
        ("Cache hit fraction", _cache(s, hits)),
        ("Preemptions", f"{preemptions:,}"),
        ("TE busy (min/mean/max)", f"{min(busy):.2f} / {sum(busy) / len(busy):.2f} / {max(busy):.2f}"),
        ("Routing", ", ".join(f"{k} {v}" for k, v in result.reasons.items()) or "-"),
    ]
    if cfg.itl_sample_every > 1:
        rows.append(("ITL sample", f"1 request in {cfg.itl_sample_every}"))
    lines = [" deepflow sim run ".center(width, "="), *(f"{k + ':':<34}{v}" for k, v in rows), "-" * width]
    lines.append(f"{'Latency (ms)':<14}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}")
    for name, stats in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        values = (None,) * 5 if stats is None else (stats.mean, stats.p50, stats.p90, stats.p99, stats.max)
        lines.append(f"{name:<14}" + "".join(f"{_fmt(v):>11}" for v in values))
    if s.errors:
        lines.append("-" * width)
        lines.append("Errors: " + ", ".join(f"{kind} x{count}" for kind, count in s.errors.items()))
    lines.append("=" * width)
    return "\n".join(lines)


def _cache(s: Summary, hits: int) -> str:
    if s.cache_hit_fraction is None:
        return "-"
    return f"{s.cache_hit_fraction:.3f} ({s.total_cached_tokens:,} cached)"
