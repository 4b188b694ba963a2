"""GET /metrics: every engine's vLLM-named metrics followed by the HTTP layer's own.

Each app gets its own registries (not prometheus_client's global one) so several apps can live in one process
(tests) without "duplicated timeseries" errors. Each engine keeps its metrics in a registry of its own, so
with several models the same family (`vllm:num_requests_running`, ...) exists once per engine: rendering the
registries one after another would repeat its `# HELP`/`# TYPE` lines, which Prometheus rejects. The engines'
families are merged into one instead, told apart by their `model_name` label.

Several job executors share one port, so a scrape reaches any of them. The launcher gives them a
`PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode: each process keeps its values in files
there), and a scrape then adds up every JE's front-end and HTTP families (dead JEs' counters included, so
counters never go back), while the families fed by TE stats, which every JE receives alike, come from the
answering JE alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from deepflow.engine.metrics import STATS_FAMILIES

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


class RoutingCollector(Collector):
    """How each model's job executor routes (`RoutingCoreClient.report()`, when the engine's client has one):
    requests per serving mode and reason, and the router's decode-length predictor accuracy. This JE's own
    figures: each JE routes the requests it accepted."""

    def __init__(self, engines: Mapping[str, Any]) -> None:
        self.engines = dict(engines)

    def collect(self) -> Iterable[Metric]:
        modes = CounterMetricFamily(
            "deepflow:routing_decisions",
            "Requests routed by this job executor, by serving mode and its reason",
            labels=[MODEL_LABEL, "mode", "reason"],
        )
        accuracy = GaugeMetricFamily(
            "deepflow:decode_length_predictor_accuracy",
            "Share of the router's decode-length predictions within its tolerance (all scored; recent)",
            labels=[MODEL_LABEL, "window"],
        )
        scored = CounterMetricFamily(
            "deepflow:decode_length_predictions_scored",
            "Decode-length predictions scored against the finished requests",
            labels=[MODEL_LABEL],
        )
        for served_name, engine in self.engines.items():
            report = getattr(getattr(engine, "client", None), "report", None)
            if not callable(report):
                continue
            state = report()
            for key, count in state.get("modes", {}).items():
                mode, _, reason = key.partition("/")
                modes.add_metric([served_name, mode, reason], count)
            predictor = (state.get("router") or {}).get("predictor")
            if isinstance(predictor, dict) and "scored" in predictor:
                scored.add_metric([served_name], predictor["scored"])
                for window, value in (
                    ("all", predictor.get("accuracy")),
                    ("recent", (predictor.get("recent") or {}).get("accuracy")),
                ):
                    if value is not None:
                        accuracy.add_metric([served_name, window], value)
        return [modes, accuracy, scored]


class AcrossProcessesCollector(Collector):
    """Every process's values from a multiprocess directory, except the TE-stats and routing families,
    which come from this process (`own`)."""

    def __init__(self, path: str, own: Collector, routing: Collector | None = None) -> None:
        self.path = path
        self.own = own
        self.routing = routing

    def collect(self) -> Iterable[Metric]:
        shared = [f for f in MultiProcessCollector(None, self.path).collect() if f.name not in STATS_FAMILIES]
        mine = [f for f in self.own.collect() if f.name in STATS_FAMILIES]
        return shared + mine + (list(self.routing.collect()) if self.routing is not None else [])


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
        engine_collector = EngineMetricsCollector(engines or {})
        routing_collector = RoutingCollector(engines or {})
        self.engine_registry.register(engine_collector)
        self.engine_registry.register(routing_collector)
        self.shared_registry: CollectorRegistry | None = None
        shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared_dir:
            self.shared_registry = CollectorRegistry(auto_describe=False)
            self.shared_registry.register(
                AcrossProcessesCollector(shared_dir, engine_collector, routing_collector)
            )

    def observe(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.requests.labels(method, handler, str(status)).inc()
        self.latency.labels(method, handler).observe(seconds)

    def render(self) -> bytes:
        """Engine metrics first, then the HTTP layer's; valid even when no engine has metrics (fakes)."""
        if self.shared_registry is not None:
            return generate_latest(self.shared_registry)
        return generate_latest(self.engine_registry) + generate_latest(self.registry)
