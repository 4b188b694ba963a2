"""Aggregate per-request records into the numbers people compare, as a table and as JSON.

Only successful requests enter latencies and throughputs (a failed request has no meaningful TTFT), but
failures are always counted and grouped by kind, so a fast run with errors never looks like a clean one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from deepflow.bench.client import RequestRecord
from deepflow.bench.config import BenchConfig

__all__ = ["BenchResult", "LatencyStats", "Summary", "format_table", "percentile", "summarize"]

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencyStats:
    """Distribution of one latency, in milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> LatencyStats | None:
        if not values:
            return None
        ms = [v * 1e3 for v in values]
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(count=len(ms), mean=sum(ms) / len(ms), p50=p50, p90=p90, p99=p99, max=max(ms))


@dataclass(frozen=True)
class Summary:
    """The aggregate numbers of one run; throughputs use the measured duration (warm-up excluded)."""

    num_requests: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # successful requests per second
    output_throughput: float  # output tokens of successful requests per second
    total_token_throughput: float  # (input + output) tokens per second
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int | None
    cache_hit_fraction: float | None  # cached / prompt tokens; None when the server reports no cache
    ttft_ms: LatencyStats | None
    tpot_ms: LatencyStats | None
    itl_ms: LatencyStats | None
    e2e_ms: LatencyStats | None
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> count
    warmup_requests: int = 0
    warmup_failed: int = 0


def summarize(
    records: Sequence[RequestRecord], duration_s: float, warmup: Sequence[RequestRecord] = ()
) -> Summary:
    """Aggregate `records` of a run that took `duration_s` seconds."""
    ok = [r for r in records if r.success]
    # Input tokens as the server counted them (chat templates included) when it says so.
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    reported = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens or 0 for r in reported) if reported else None
    cache_hit = cached / input_tokens if cached is not None and input_tokens else None
    per_second = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return Summary(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        request_throughput=per_second(len(ok)),
        output_throughput=per_second(output_tokens),
        total_token_throughput=per_second(input_tokens + output_tokens),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        total_cached_tokens=cached,
        cache_hit_fraction=cache_hit,
        ttft_ms=LatencyStats.of_seconds([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_ms=LatencyStats.of_seconds([t for r in ok if (t := r.tpot_s) is not None]),
        itl_ms=LatencyStats.of_seconds([gap for r in ok for gap in r.itl_s]),
        e2e_ms=LatencyStats.of_seconds([r.e2e_s for r in ok if r.e2e_s is not None]),
        errors=dict(Counter(r.error_kind or "error" for r in records if not r.success).most_common()),
        warmup_requests=len(warmup),
        warmup_failed=sum(not r.success for r in warmup),
    )


@dataclass
class BenchResult:
    """A finished run: its config, aggregate summary, per-request records and where prompts came from."""

    config: BenchConfig
    summary: Summary
    records: list[RequestRecord]
    tokenizer: str
    started_at: str  # ISO 8601, UTC
    version: str

    def to_dict(self) -> dict[str, Any]:
        """Everything a script needs to tabulate runs side by side (latencies in ms)."""
        return {
            "label": self.config.label,
            "deepflow_version": self.version,
            "started_at": self.started_at,
            "url": self.config.root_url + self.config.path,
            "tokenizer": self.tokenizer,
            "config": self.config.to_dict(),
            "summary": asdict(self.summary),
            "requests": [r.to_dict() for r in self.records],
        }

    def table(self) -> str:
        return format_table(self)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def summary_rows(s: Summary) -> list[tuple[str, str]]:
    """The counts and rates every report prints (bench serve's and the simulator's)."""
    return [
        ("Successful requests", f"{s.completed} of {s.num_requests}"),
        ("Failed requests", str(s.failed)),
        ("Duration (s)", _fmt(s.duration_s)),
        ("Request throughput (req/s)", _fmt(s.request_throughput)),
        ("Output token throughput (tok/s)", _fmt(s.output_throughput)),
        ("Total token throughput (tok/s)", _fmt(s.total_token_throughput)),
        ("Total input tokens", f"{s.total_input_tokens:,}"),
        ("Total output tokens", f"{s.total_output_tokens:,}"),
        (
            "Cache hit fraction",
            "n/a (server reports no cached tokens)"
            if s.cache_hit_fraction is None
            else f"{s.cache_hit_fraction:.3f} ({s.total_cached_tokens:,} cached)",
        ),
    ]


def render_report(
    title: str, rows: list[tuple[str, str]], s: Summary, first_error: str | None = None, width: int = 72
) -> str:
    """The fixed-width layout: `rows` as label: value, the latency table, the errors."""
    lines = [title.center(width, "="), *(f"{k + ':':<34}{v}" for k, v in rows), "-" * width]
    lines.append(f"{'Latency (ms)':<14}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}")
    for name, stats in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms), ("E2E", s.e2e_ms)):
        values = (None,) * 5 if stats is None else (stats.mean, stats.p50, stats.p90, stats.p99, stats.max)
        lines.append(f"{name:<14}" + "".join(f"{_fmt(v):>11}" for v in values))
    if s.errors:
        lines.append("-" * width)
        lines.append("Errors: " + ", ".join(f"{kind} x{count}" for kind, count in s.errors.items()))
        if first_error:
            lines.append(f"  first: {first_error[: width * 2]}")
    lines.append("=" * width)
    return "\n".join(lines)


def format_table(result: BenchResult) -> str:
    """A fixed-width report for stdout."""
    cfg, s = result.config, result.summary
    title = f" deepflow bench serve{f': {cfg.label}' if cfg.label else ''} "
    rows = [
        ("Target", f"{cfg.root_url}{cfg.path} (model {cfg.model})"),
        ("Workload", f"{cfg.describe_workload()}, output {cfg.output_len}"),
        ("Load", cfg.describe_load()),
        *summary_rows(s),
    ]
    if s.warmup_requests:
        rows.append(("Warm-up requests (not counted)", f"{s.warmup_requests} ({s.warmup_failed} failed)"))
    example = next((r.error for r in result.records if not r.success and r.error), None)
    return render_report(title, rows, s, example)
