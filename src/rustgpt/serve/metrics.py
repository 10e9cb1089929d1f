"""The server's Prometheus metrics (prometheus-client), one registry per app: requests by
route and status, tokens, time to first token, per-token latency, queue and batch."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: a default model's step takes ~1 ms, a prefill a few; a d512 model's 10x that
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The counters, gauges and histograms the app and the engine update (all
    thread-safe), and ``render()``, the Prometheus text of /metrics."""

    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rustgpt_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("rustgpt_prompt_tokens", "Prompt tokens prefilled",
                                     registry=r)
        self.completion_tokens = Counter("rustgpt_completion_tokens",
                                         "Tokens generated, counted as each request ends",
                                         registry=r)
        self.time_to_first_token = Histogram(
            "rustgpt_time_to_first_token_seconds", "From a request's arrival in the queue to "
            "its first token", buckets=_LATENCY, registry=r)
        self.time_per_token = Histogram(
            "rustgpt_time_per_output_token_seconds", "Between a request's successive tokens",
            buckets=_LATENCY, registry=r)
        self.active = Gauge("rustgpt_active_requests", "Requests being decoded", registry=r)
        self.queued = Gauge("rustgpt_queued_requests", "Requests waiting for a slot",
                            registry=r)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.batch_size = Histogram("rustgpt_batch_size", "Rows of each batched decoding step",
                                    buckets=[s for s in sizes if s <= max_batch], registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
