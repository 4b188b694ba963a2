"""GET /metrics: the engine's vLLM-named metrics followed by the HTTP layer's own.

Each app gets its own registry (not prometheus_client's global one) so several apps can live in one process
(tests) without "duplicated timeseries" errors.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class HTTPMetrics:
    def __init__(self) -> None:
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

    def observe(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.requests.labels(method, handler, str(status)).inc()
        self.latency.labels(method, handler).observe(seconds)

    def render(self, engine: Any) -> bytes:
        """Engine metrics first; an engine without `metrics` still gets a valid exposition."""
        parts = []
        engine_metrics = getattr(engine, "metrics", None)
        if engine_metrics is not None:
            text = engine_metrics.render()
            parts.append(text if text.endswith(b"\n") or not text else text + b"\n")
        parts.append(generate_latest(self.registry))
        return b"".join(parts)
