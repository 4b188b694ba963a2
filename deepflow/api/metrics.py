"""GET /metrics: every engine's vLLM-named metrics followed by the HTTP layer's own.

Each app gets its own registries (not prometheus_client's global one) so several apps can live in one process
(tests) without "duplicated timeseries" errors. Each engine keeps its metrics in a registry of its own, so
with several models the same family (`vllm:num_requests_running`, ...) exists once per engine: rendering the
registries one after another would repeat its `# HELP`/`# TYPE` lines, which Prometheus rejects. The engines'
families are merged into one instead, told apart by their `model_name` label.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MODEL_LABEL = "model_name"


class EngineMetricsCollector(Collector):
    """The metrics of several engines (served name -> engine) as one set of families.

    A sample's `model_name` is set to the served name: that is the name clients and dashboards know, and the
    names are unique within an app, so two engines' samples never collide even if the engines were built
    with the same label. An engine without `metrics.registry` (a fake) contributes nothing."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        self.engines = dict(engines)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for served_name, engine in self.engines.items():
            registry = getattr(getattr(engine, "metrics", None), "registry", None)
            if registry is None:
                continue
            for family in registry.collect():
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                merged.samples.extend(
                    sample._replace(labels={**sample.labels, MODEL_LABEL: served_name})
                    if MODEL_LABEL in sample.labels
                    else sample
                    for sample in family.samples
                )
        return list(families.values())


class HTTPMetrics:
    def __init__(self, engines: Mapping[str, Any] | None = None) -> None:
        self.registry = CollectorRegistry()
        # Named like prometheus-fastapi-instrumentator's, which vLLM's dashboards read.
        self.requests = Counter(
            "http_requests",
            "HTTP requests by handler",
            ["method", "handler", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time to the end of the response (streams included)",
            ["method", "handler"],
            registry=self.registry,
        )
        self.engine_registry = CollectorRegistry(auto_describe=False)
        self.engine_registry.register(EngineMetricsCollector(engines or {}))

    def observe(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.requests.labels(method, handler, str(status)).inc()
        self.latency.labels(method, handler).observe(seconds)

    def render(self) -> bytes:
        """Engine metrics first, then the HTTP layer's; valid even when no engine has metrics (fakes)."""
        return generate_latest(self.engine_registry) + generate_latest(self.registry)
