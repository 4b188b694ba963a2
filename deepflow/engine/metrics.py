"""Prometheus metrics under vLLM's names, so existing dashboards work unchanged.

Engine-side totals (preemptions, prefix-cache tokens) arrive as cumulative numbers with each step's
`SchedulerStats`; per-request latencies are observed by the front end, which sees every token arrive.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from deepflow.engine.request import SchedulerStats

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
)


# Families fed by the TEs' `SchedulerStats`: every job executor receives the same stats, so with several JEs
# these are taken from the JE that answers the scrape, never added up (the front end's families are).
STATS_FAMILIES = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_preemptions",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "deepflow:prefix_cache_hits_host",
        "deepflow:kv_blocks_evicted",
        "deepflow:host_kv_blocks_evicted",
        "deepflow:kv_populate_latency_seconds",
        "deepflow:pinned_context_tokens",
    }
)


class EngineMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self._running = Gauge(
            "vllm:num_requests_running", "Requests in the running batch", labels, registry=r
        )
        self._waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to run", labels, registry=r)
        self._kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full)", labels, registry=r)
        self._prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed", labels, registry=r)
        self._generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", labels, registry=r)
        self._success = Counter(
            "vllm:request_success", "Finished requests", [*labels, "finished_reason"], registry=r
        )
        self._preemptions = Counter("vllm:num_preemptions", "Preemptions", labels, registry=r)
        self._prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels, registry=r
        )
        self._prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels, registry=r
        )
        self._prefix_hits_host = Counter(
            "deepflow:prefix_cache_hits_host",
            "Of the prefix-cache hits, prompt tokens populated back from the host tier",
            labels,
            registry=r,
        )
        self._kv_evicted = Counter(
            "deepflow:kv_blocks_evicted", "KV blocks evicted from the device pool", labels, registry=r
        )
        self._host_evicted = Counter(
            "deepflow:host_kv_blocks_evicted", "KV blocks dropped from the host tier", labels, registry=r
        )
        self._populate = Histogram(
            "deepflow:kv_populate_latency_seconds",
            "From issuing a host-tier populate to the step that reports it done",
            labels,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self._pinned = Gauge(
            "deepflow:pinned_context_tokens", "Tokens pinned by explicit contexts", labels, registry=r
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between tokens",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency", labels, buckets=_E2E_BUCKETS, registry=r
        )
        self._queue = Histogram(
            "vllm:request_queue_time_seconds",
            "Time waiting before first scheduled",
            labels,
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.model_name = model_name
        self._last = SchedulerStats(
            num_running=0,
            num_waiting=0,
            kv_cache_usage=0.0,
            num_preemptions_total=0,
            prefix_cache_queries_total=0,
            prefix_cache_hits_total=0,
        )
        for metric in (
            self._running,
            self._waiting,
            self._kv_usage,
            self._prompt_tokens,
            self._generation_tokens,
            self._preemptions,
            self._prefix_queries,
            self._prefix_hits,
            self._prefix_hits_host,
            self._kv_evicted,
            self._host_evicted,
            self._populate,
            self._pinned,
            self._ttft,
            self._itl,
            self._e2e,
            self._queue,
        ):
            metric.labels(model_name)  # export zeros from the start, as vLLM does

    @property
    def kv_cache_usage(self) -> float:
        return self._last.kv_cache_usage

    @property
    def last_stats(self) -> SchedulerStats:
        return self._last

    def record_stats(self, stats: SchedulerStats) -> None:
        m = self.model_name
        self._running.labels(m).set(stats.num_running)
        self._waiting.labels(m).set(stats.num_waiting)
        self._kv_usage.labels(m).set(stats.kv_cache_usage)
        self._preemptions.labels(m).inc(
            max(stats.num_preemptions_total - self._last.num_preemptions_total, 0)
        )
        self._prefix_queries.labels(m).inc(
            max(stats.prefix_cache_queries_total - self._last.prefix_cache_queries_total, 0)
        )
        self._prefix_hits.labels(m).inc(
            max(stats.prefix_cache_hits_total - self._last.prefix_cache_hits_total, 0)
        )
        self._prefix_hits_host.labels(m).inc(
            max(stats.prefix_cache_host_hits_total - self._last.prefix_cache_host_hits_total, 0)
        )
        self._kv_evicted.labels(m).inc(
            max(stats.kv_blocks_evicted_total - self._last.kv_blocks_evicted_total, 0)
        )
        self._host_evicted.labels(m).inc(
            max(stats.host_blocks_evicted_total - self._last.host_blocks_evicted_total, 0)
        )
        for latency in stats.populate_latencies:
            self._populate.labels(m).observe(latency)
        self._pinned.labels(m).set(stats.pinned_context_tokens)
        self._last = stats

    def record_first_token(self, ttft: float, prompt_tokens: int) -> None:
        self._ttft.labels(self.model_name).observe(ttft)
        self._prompt_tokens.labels(self.model_name).inc(prompt_tokens)

    def record_tokens(self, count: int, inter_token_latency: float | None) -> None:
        self._generation_tokens.labels(self.model_name).inc(count)
        if inter_token_latency is not None:
            self._itl.labels(self.model_name).observe(inter_token_latency)

    def record_queue_time(self, seconds: float) -> None:
        self._queue.labels(self.model_name).observe(max(seconds, 0.0))

    def record_finished(self, finish_reason: str, e2e: float) -> None:
        self._success.labels(self.model_name, finish_reason).inc()
        self._e2e.labels(self.model_name).observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
