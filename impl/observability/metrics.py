"""Prometheus metrics. One registry per app, so tests and several apps in one process never
share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ragapi_requests_total",
            "HTTP requests answered, by operation and status.",
            ["operation", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ragapi_request_duration_seconds",
            "Time to answer an HTTP request, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ragapi_requests_in_flight",
            "HTTP requests being answered now.",
            registry=self.registry,
        )

        self.unauthorized = Counter(
            "ragapi_unauthorized_total",
            "Requests refused for a missing, invalid or revoked API key, by operation.",
            ["operation"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "ragapi_rate_limited_total",
            "Requests refused by a rate limit, by operation.",
            ["operation"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
