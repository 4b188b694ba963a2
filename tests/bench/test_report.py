"""Percentiles, aggregation, SSE parsing and the JSON/table outputs (no server involved)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

import numpy as np
import pytest

from deepflow.bench.client import RequestRecord, iter_sse_data
from deepflow.bench.config import BenchConfig
from deepflow.bench.report import BenchResult, LatencyStats, percentile, summarize
from deepflow.bench.serve import poisson_arrivals


def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 101):
        values = rng.exponential(size=n).tolist()
        for q in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_stats_are_in_milliseconds() -> None:
    stats = LatencyStats.of_seconds([0.001 * i for i in range(1, 101)])
    assert stats is not None
    assert stats.count == 100 and stats.max == pytest.approx(100.0)
    assert stats.mean == pytest.approx(50.5)
    assert stats.p50 == pytest.approx(50.5) and stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    assert LatencyStats.of_seconds([]) is None


def _ok(index: int, ttft: float, itl: list[float], prompt: int, cached: int | None) -> RequestRecord:
    record = RequestRecord(index, index, 0, prompt_len=prompt, success=True, ttft_s=ttft, itl_s=itl)
    record.e2e_s = ttft + sum(itl)
    record.output_tokens = len(itl) + 1
    record.prompt_tokens = prompt + 2  # the server's count (e.g. template tokens) wins over ours
    record.cached_tokens = cached
    return record


def test_summary_aggregates_successes_and_counts_failures() -> None:
    records = [
        _ok(0, 0.1, [0.01, 0.03], prompt=98, cached=0),
        _ok(1, 0.3, [0.02], prompt=98, cached=50),
        _ok(2, 0.2, [], prompt=98, cached=None),
    ]
    for i, kind in enumerate(["HTTP 500", "timeout", "HTTP 500"], start=3):
        failed = RequestRecord(i, i, 0, prompt_len=98)
        failed.fail(kind, "detail")
        records.append(failed)
    s = summarize(records, duration_s=2.0)
    assert (s.num_requests, s.completed, s.failed) == (6, 3, 3)
    assert s.errors == {"HTTP 500": 2, "timeout": 1}
    assert s.total_input_tokens == 300 and s.total_output_tokens == 3 + 2 + 1
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_throughput == pytest.approx(3.0)
    assert s.total_token_throughput == pytest.approx(153.0)
    assert s.total_cached_tokens == 50 and s.cache_hit_fraction == pytest.approx(50 / 300)
    assert s.ttft_ms is not None and s.ttft_ms.mean == pytest.approx(200.0)
    assert s.itl_ms is not None and s.itl_ms.count == 3 and s.itl_ms.mean == pytest.approx(20.0)
    # TPOT = (e2e - ttft) / (output_tokens - 1): 20 ms and 20 ms; a one-token answer has none.
    assert s.tpot_ms is not None and s.tpot_ms.count == 2 and s.tpot_ms.mean == pytest.approx(20.0)
    assert s.e2e_ms is not None and s.e2e_ms.max == pytest.approx(320.0)


def test_summary_without_cache_or_successes() -> None:
    record = _ok(0, 0.1, [0.01], prompt=10, cached=None)
    failed = RequestRecord(1, 1, 0, prompt_len=10)
    failed.fail("timeout")
    s = summarize([record], 1.0)
    assert s.cache_hit_fraction is None and s.total_cached_tokens is None
    s = summarize([failed], 1.0)
    assert s.completed == 0 and s.ttft_ms is None and s.request_throughput == 0.0
    assert s.errors == {"timeout": 1}


def test_result_json_and_table() -> None:
    config = BenchConfig(base_url="http://127.0.0.1:1/v1/", model="m", api_key="secret", label="run-a")
    failed = RequestRecord(1, 1, 0, prompt_len=10)
    failed.fail("HTTP 500", "boom")
    records = [_ok(0, 0.1, [0.01, 0.02], prompt=10, cached=4), failed]
    result = BenchResult(config, summarize(records, 1.0), records, "whitespace", "2025-01-01T00:00:00", "0")
    data = json.loads(json.dumps(result.to_dict()))
    assert data["label"] == "run-a" and data["url"] == "http://127.0.0.1:1/v1/completions"
    assert data["config"]["api_key"] == "***" and "secret" not in json.dumps(data)
    assert data["summary"]["failed"] == 1 and data["summary"]["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert [r["success"] for r in data["requests"]] == [True, False]
    assert data["requests"][0]["itl_ms"] == [10.0, 20.0] and "text" not in data["requests"][0]
    table = result.table()
    for needle in ("run-a", "Request throughput", "TTFT", "TPOT", "ITL", "E2E", "HTTP 500 x1", "0.333"):
        assert needle in table


def test_sse_parser() -> None:
    async def lines() -> AsyncIterator[str]:
        for line in [
            ": keep-alive",
            'data: {"a": 1}',
            "",
            "event: error",
            "data: x",
            "data: y",
            "",
            "data:z",
        ]:
            yield line

    async def collect() -> list[tuple[str, str]]:
        return [item async for item in iter_sse_data(lines())]

    assert asyncio.run(collect()) == [("message", '{"a": 1}'), ("error", "x\ny"), ("message", "z")]


def test_poisson_arrivals_are_seeded_and_have_the_rate() -> None:
    a = poisson_arrivals(20_000, rps=50.0, seed=1)
    assert a == poisson_arrivals(20_000, rps=50.0, seed=1)
    assert a != poisson_arrivals(20_000, rps=50.0, seed=2)
    assert a[0] == 0.0 and all(x <= y for x, y in itertools.pairwise(a))
    assert len(a) / a[-1] == pytest.approx(50.0, rel=0.05)
    assert poisson_arrivals(0, 1.0, 0) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(dataset="multi-turn", endpoint="completions"), "chat"),
        (dict(dataset="sharegpt"), "--dataset"),
        (dict(input_len=0), "--input-len"),
        (dict(concurrency=0), "--concurrency"),
        (dict(rps=0.0), "--rps"),
        (dict(base_url="127.0.0.1:8000"), "http"),
        (dict(timeout=0), "--timeout"),
    ],
)
def test_config_validation(change: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"base_url": "http://127.0.0.1:8000", "model": "m", **change}
    config = BenchConfig(**settings)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        config.validate()


def test_config_defaults() -> None:
    config = BenchConfig(base_url="http://127.0.0.1:8000/v1", model="m", dataset="multi-turn")
    assert config.root_url == "http://127.0.0.1:8000" and config.path == "/v1/chat/completions"
    assert config.workers == 1
    assert BenchConfig(base_url="http://h", model="m", rps=2.0).workers is None
    assert BenchConfig(base_url="http://h", model="m", rps=2.0, concurrency=3).workers == 3
