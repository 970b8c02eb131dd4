"""Prometheus metrics.

One process: each app has its own registry, so tests and several apps in one process never
share counters. Several worker processes (`ragapi serve --workers N`): prometheus-client's
multiprocess mode, switched on by PROMETHEUS_MULTIPROC_DIR, which `ragapi serve` sets before
the workers start; every worker writes its values to files there and any worker's scrape sums
them. The store gauges are read from the registry at scrape time, so they are the same whatever
process answers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector


class StoreCounts(Protocol):
    """What the store holds; impl.rag.types.StoreCounts has this shape."""

    @property
    def documents(self) -> Mapping[str, int]: ...
    @property
    def jobs(self) -> Mapping[str, int]: ...
    @property
    def chunks(self) -> int: ...


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StoreCollector(Collector):
    """Documents, chunks and jobs held, counted in the registry when Prometheus scrapes."""

    def __init__(self, counts: Callable[[], StoreCounts]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self.counts()
        documents = GaugeMetricFamily(
            "ragapi_documents", "Documents stored, by status.", labels=["status"]
        )
        for status, n in sorted(counts.documents.items()):
            documents.add_metric([status], n)
        jobs = GaugeMetricFamily(
            "ragapi_ingest_jobs", "Ingestion jobs, by state.", labels=["state"]
        )
        for state, n in sorted(counts.jobs.items()):
            jobs.add_metric([state], n)
        yield documents
        yield jobs
        yield GaugeMetricFamily("ragapi_chunks", "Chunks of ready documents.", value=counts.chunks)


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = MULTIPROC_ENV in os.environ
        # In multiprocess mode values live in files, not in a registry.
        registry = None if self.multiprocess else CollectorRegistry()
        self.registry = registry
        self.store_counts: Callable[[], StoreCounts] | None = None
        self.requests = Counter(
            "ragapi_requests_total",
            "HTTP requests answered, by operation and status.",
            ["operation", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "ragapi_request_duration_seconds",
            "Time to answer an HTTP request, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "ragapi_requests_in_flight",
            "HTTP requests being answered now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.unauthorized = Counter(
            "ragapi_unauthorized_total",
            "Requests refused for a missing, invalid or revoked API key, by operation.",
            ["operation"],
            registry=registry,
        )
        self.rate_limited = Counter(
            "ragapi_rate_limited_total",
            "Requests refused by a rate limit, by operation.",
            ["operation"],
            registry=registry,
        )
        self.stage_latency = Histogram(
            "ragapi_stage_duration_seconds",
            "Time spent in a stage of the RAG stack: embedding, retrieval, generation.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.embedded = Counter(
            "ragapi_chunks_embedded_total", "Chunks embedded by ingestion.", registry=registry
        )
        self.jobs = Counter(
            "ragapi_ingest_job_events_total",
            "What became of the ingestion jobs this process handled: claimed, succeeded, "
            "failed, released (at shutdown), reclaimed (another worker's lease ran out), "
            "given_up (interrupted too often).",
            ["event"],
            registry=registry,
        )
        self._answered: dict[tuple[str, int], tuple[Counter, Histogram, Counter | None]] = {}

    def answered(self, operation: str, status: int, seconds: float) -> None:
        """One HTTP request answered. Every request calls this, so each labelled child is
        looked up once (operations and statuses are few) rather than on every call."""
        children = self._answered.get((operation, status))
        if children is None:
            refused = {401: self.unauthorized, 429: self.rate_limited}.get(status)
            children = (
                self.requests.labels(operation, str(status)),
                self.latency.labels(operation),
                refused.labels(operation) if refused is not None else None,
            )
            self._answered[operation, status] = children
        count, latency, refusals = children
        count.inc()
        latency.observe(seconds)
        if refusals is not None:
            refusals.inc()

    # impl.rag.types.StageObserver
    def observe(
        self, stage: Literal["embedding", "retrieval", "generation"], seconds: float
    ) -> None:
        self.stage_latency.labels(stage).observe(seconds)

    def chunks_embedded(self, count: int) -> None:
        self.embedded.inc(count)

    def ingest_job(self, event: str) -> None:
        self.jobs.labels(event).inc()

    def render(self) -> bytes:
        registry = CollectorRegistry()
        if self.multiprocess:
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            assert self.registry is not None
            registry = self.registry
        if self.store_counts is not None:
            registry = merged(registry, StoreCollector(self.store_counts))
        return generate_latest(registry)


def merged(registry: CollectorRegistry, extra: Collector) -> CollectorRegistry:
    """A registry that collects `registry` and `extra`, leaving `registry` as it was."""
    combined = CollectorRegistry()
    combined.register(registry)  # a registry is itself a collector
    combined.register(extra)
    return combined
