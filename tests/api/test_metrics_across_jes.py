"""/metrics with several job executors: front-end families add up across JEs, TE-stats families do not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deepflow.api.metrics import HTTPMetrics
from deepflow.engine.metrics import EngineMetrics
from deepflow.engine.request import SchedulerStats

# One JE's life: it finishes `n` requests and observes the same TE stats every JE receives.
JE = """
import sys
from deepflow.api.metrics import HTTPMetrics
from deepflow.engine.metrics import EngineMetrics
from deepflow.engine.request import SchedulerStats
n = int(sys.argv[1])
metrics = EngineMetrics("smol")
http = HTTPMetrics()
for _ in range(n):
    metrics.record_finished("stop", 0.5)
    http.observe("POST", "/v1/completions", 200, 0.5)
metrics.record_stats(SchedulerStats(num_running=3, num_waiting=0, kv_cache_usage=0.25,
                                    num_preemptions_total=7, prefix_cache_queries_total=0,
                                    prefix_cache_hits_total=0))
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_scrape_adds_up_every_jes_front_end_but_not_the_te_stats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "metrics"
    shared.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(shared), "PYTHONPATH": str(Path(__file__).parents[2])}
    for n in (2, 3):  # two JEs (one of them may be dead by the time of the scrape: its counts stay)
        subprocess.run([sys.executable, "-c", JE, str(n)], env=env, check=True)
    # The JE that answers: it served nothing itself, but receives the same TE stats as the others.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    own = EngineMetrics("smol")
    own.record_stats(
        SchedulerStats(
            num_running=3,
            num_waiting=0,
            kv_cache_usage=0.25,
            num_preemptions_total=7,
            prefix_cache_queries_total=0,
            prefix_cache_hits_total=0,
        )
    )
    scraped = samples(HTTPMetrics({"smol": SimpleNamespace(metrics=own)}).render().decode())
    model = (("model_name", "smol"),)
    assert scraped[("vllm:request_success_total", (("finished_reason", "stop"), *model))] == 5
    assert scraped[("vllm:e2e_request_latency_seconds_count", model)] == 5
    handler = (("handler", "/v1/completions"), ("method", "POST"), ("status", "200"))
    assert scraped[("http_requests_total", handler)] == 5
    # TE stats: what one JE saw, not three times it.
    assert scraped[("vllm:num_preemptions_total", model)] == 7
    assert scraped[("vllm:num_requests_running", model)] == 3
    assert not any(name == "pid" for _, labels in scraped for name, _ in labels)  # no per-process gauges
