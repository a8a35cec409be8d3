"""Prometheus metrics, one registry per app (so tests can build many apps in one process).

Times are seconds from the monotonic clock. `generation_tokens` grows by exactly the
`usage.completion_tokens` served, because the serving layer records it from the same count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MetricT = TypeVar("MetricT", bound=MetricWrapperBase)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKENS_PER_FORWARD_BUCKETS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)
_STEPS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


# attribute: (metric name, help, buckets)
_HISTOGRAMS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "ttft": ("dgserve_time_to_first_token_seconds", "Time from arrival to the first token.", _LATENCY_BUCKETS),
    "itl": (
        "dgserve_inter_token_latency_seconds",
        "Time between streamed token deliveries, per token.",
        _LATENCY_BUCKETS,
    ),
    "e2e": ("dgserve_e2e_request_latency_seconds", "Time from arrival to the last token.", _LATENCY_BUCKETS),
    "queue_time": (
        "dgserve_request_queue_time_seconds",
        "Time a request waited before the model thread admitted it.",
        _LATENCY_BUCKETS,
    ),
    "tokens_per_forward": (
        "dgserve_tokens_per_forward",
        "Tokens committed per forward pass, per finished request.",
        _TOKENS_PER_FORWARD_BUCKETS,
    ),
    "denoising_steps": (
        "dgserve_denoising_steps_per_block",
        "Denoising steps a committed block took (block diffusion).",
        _STEPS_BUCKETS,
    ),
}


# The samplers' prefix-cache totals (sampler/runtime/prefix_cache.PrefixCacheStats): key: (name, help).
_PREFIX_CACHE_COUNTERS: dict[str, tuple[str, str]] = {
    "queries": ("dgserve_prefix_cache_queries", "Prompts looked up in the prefix cache."),
    "hits": ("dgserve_prefix_cache_hits", "Prompts that reused at least one cached block."),
    "query_tokens": ("dgserve_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache."),
    "reused_tokens": ("dgserve_prefix_cache_reused_tokens", "Prompt tokens whose KV came from the prefix cache."),
    "evicted_blocks": ("dgserve_prefix_cache_evicted_blocks", "Prefix-cache blocks evicted (LRU, byte budget)."),
}


class _PrefixCacheCollector(Collector):
    """Reads the totals at scrape time from `source` (the engine's samplers): the model thread
    counts, so nothing is copied per step."""

    def __init__(self, model_name: str, source: Callable[[], Mapping[str, int]]) -> None:
        self.model_name = model_name
        self.source = source

    def collect(self) -> Iterator[Metric]:
        totals = self.source()
        for key, (name, documentation) in _PREFIX_CACHE_COUNTERS.items():
            counter = CounterMetricFamily(name, documentation, labels=["model_name"])
            counter.add_metric([self.model_name], totals.get(key, 0))
            yield counter
        gauge = GaugeMetricFamily("dgserve_prefix_cache_bytes", "Bytes the prefix cache holds.", labels=["model_name"])
        gauge.add_metric([self.model_name], totals.get("bytes_used", 0))
        yield gauge


class Metrics:
    # The histograms, declared for type checkers; __init__ builds them from _HISTOGRAMS.
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue_time: Histogram
    tokens_per_forward: Histogram
    denoising_steps: Histogram

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        for attribute, (name, documentation, buckets) in _HISTOGRAMS.items():
            setattr(self, attribute, self._histogram(name, documentation, buckets))
        self.prompt_tokens = self._counter("dgserve_prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = self._counter("dgserve_generation_tokens", "Completion tokens served.")
        self.forward_passes = self._counter("dgserve_forward_passes", "Model forward passes per sequence.")
        self.request_success = self._counter(
            "dgserve_request_success", "Finished requests by finish reason.", "finished_reason"
        )
        self.request_errors = self._counter(
            "dgserve_request_errors", "Requests answered with an error, by code.", "code"
        )
        self.running = self._gauge("dgserve_requests_running", "Sequences the model thread is generating.")
        self.waiting = self._gauge("dgserve_requests_waiting", "Sequences queued for the model thread.")
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        self.running.labels(model_name).set(0)
        self.waiting.labels(model_name).set(0)

    def watch_prefix_cache(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Export the prefix-cache totals `source()` returns (keys of PrefixCacheStats) on /metrics."""
        self.registry.register(_PrefixCacheCollector(self.model_name, source))

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(name, documentation, ["model_name"], buckets=buckets, registry=self.registry)

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, ["model_name"], registry=self.registry)

    def _counter(self, name: str, documentation: str, *extra_labels: str) -> Counter:
        return Counter(name, documentation, ["model_name", *extra_labels], registry=self.registry)

    def label(self, metric: MetricT) -> MetricT:
        """`metric`'s child for this server's model (every metric is labelled by model_name)."""
        return metric.labels(self.model_name)
