"""Prometheus metrics, one registry per app (so tests can build many apps in one process).

Times are seconds from the monotonic clock. `generation_tokens` grows by exactly the
`usage.completion_tokens` served, because the serving layer records it from the same count.
"""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

MetricT = TypeVar("MetricT", bound=MetricWrapperBase)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKENS_PER_FORWARD_BUCKETS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)
_STEPS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram(
            "dgserve_time_to_first_token_seconds",
            "Time from arrival to the first token.",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "dgserve_inter_token_latency_seconds",
            "Time between streamed token deliveries, per token.",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "dgserve_e2e_request_latency_seconds",
            "Time from arrival to the last token.",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "dgserve_request_queue_time_seconds",
            "Time a request waited before the model thread admitted it.",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_forward = Histogram(
            "dgserve_tokens_per_forward",
            "Tokens committed per forward pass, per finished request.",
            m,
            buckets=_TOKENS_PER_FORWARD_BUCKETS,
            registry=r,
        )
        self.denoising_steps = Histogram(
            "dgserve_denoising_steps_per_block",
            "Denoising steps a committed block took (block diffusion).",
            m,
            buckets=_STEPS_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("dgserve_prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("dgserve_generation_tokens", "Completion tokens served.", m, registry=r)
        self.forward_passes = Counter("dgserve_forward_passes", "Model forward passes per sequence.", m, registry=r)
        self.request_success = Counter(
            "dgserve_request_success", "Finished requests by finish reason.", m + ["finished_reason"], registry=r
        )
        self.request_errors = Counter(
            "dgserve_request_errors", "Requests answered with an error, by code.", m + ["code"], registry=r
        )
        self.running = Gauge("dgserve_requests_running", "Sequences the model thread is generating.", m, registry=r)
        self.waiting = Gauge("dgserve_requests_waiting", "Sequences queued for the model thread.", m, registry=r)
        for reason in ("stop", "length", "abort"):
            self.request_success.labels(model_name, reason)
        self.running.labels(model_name).set(0)
        self.waiting.labels(model_name).set(0)

    def label(self, metric: MetricT) -> MetricT:
        """`metric`'s child for this server's model (every metric is labelled by model_name)."""
        return metric.labels(self.model_name)
