"""Rate limits: one budget per kind of work (cheap reads, queries, ingestion), counted per key
in a moving window. memory:// counts in this process; any other URL (redis://host:6379) is a
storage of the `limits` library, shared by every worker."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.concurrency import run_in_threadpool

from impl.dependencies import Dependency
from impl.settings import Settings

SWEEP_SECONDS = 60.0
# A storage that takes longer than this to answer is treated as down, so that requests are
# refused quickly instead of piling up behind it.
STORAGE_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    budget: str
    limit: int
    window_seconds: int
    remaining: int
    reset_seconds: int

    def headers(self) -> list[tuple[str, str]]:
        """The IETF RateLimit and RateLimit-Policy structured fields."""
        return [
            ("RateLimit-Policy", f'"{self.budget}";q={self.limit};w={self.window_seconds}'),
            ("RateLimit", f'"{self.budget}";r={self.remaining};t={self.reset_seconds}'),
        ]


class LocalWindows:
    """Moving windows in this process: the hit times of each budget and identity, oldest
    first. `limits`' own MemoryStorage starts a timer thread on nearly every hit (about 0.75 ms
    of CPU per hit here, measured); this costs microseconds."""

    def __init__(self) -> None:
        self._hits: dict[tuple[str, str], tuple[float, deque[float]]] = {}
        self._lock = threading.Lock()
        self._next_sweep = time.monotonic() + SWEEP_SECONDS

    def hit(self, item: RateLimitItem, budget: str, identity: str) -> tuple[bool, int, float]:
        """(allowed, remaining, seconds until the oldest counted hit leaves the window)."""
        window = item.get_expiry()
        now = time.monotonic()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            entry = self._hits.get((budget, identity))
            hits = entry[1] if entry is not None else deque()
            self._hits[budget, identity] = (window, hits)  # a key's override may change it
            while hits and hits[0] <= now - window:
                hits.popleft()
            allowed = len(hits) < item.amount
            if allowed:
                hits.append(now)
            reset = hits[0] + window - now if hits else 0.0
            return allowed, max(0, item.amount - len(hits)), reset

    def _sweep(self, now: float) -> None:
        """Forget identities whose every hit has left its window, so that clients who come
        and go (every address, with auth off) cannot grow the table without bound."""
        idle = [
            key
            for key, (window, hits) in self._hits.items()
            if not hits or hits[-1] <= now - window
        ]
        for key in idle:
            del self._hits[key]
        self._next_sweep = now + SWEEP_SECONDS


class SharedWindows:
    """Moving windows in a `limits` storage that several workers share (redis://...).

    When the storage does not answer, requests are refused with a 503 (counting nothing is
    not an option: the budgets would be off for everyone); its Dependency logs the outage once,
    when it starts and when it ends. The client reconnects by itself on the next call."""

    def __init__(self, url: str) -> None:
        timeout = STORAGE_TIMEOUT_SECONDS
        self._storage = storage_from_string(
            url, socket_connect_timeout=timeout, socket_timeout=timeout
        )
        self._strategy = MovingWindowRateLimiter(self._storage)
        parts = urlsplit(url)
        # No password in logs.
        address = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        self.dependency = Dependency("rate-limit storage", f"rate-limit storage {address}")

    def hit(self, item: RateLimitItem, budget: str, identity: str) -> tuple[bool, int, float]:
        """As LocalWindows.hit, with a network round trip."""
        try:
            allowed = self._strategy.hit(item, budget, identity)
            stats = self._strategy.get_window_stats(item, budget, identity)
        except Exception as exc:
            # Whatever the storage's client raises (connection refused, timeout, a protocol
            # error) means the storage failed, not the request.
            raise self.dependency.failed(exc) from None
        self.dependency.answered()
        return allowed, stats.remaining, stats.reset_time - time.time()

    def ping(self) -> None:
        """Raise DependencyUnavailable unless the storage answers (readiness)."""
        if not self._storage.check():
            raise self.dependency.failed(ConnectionError("no answer to PING"))
        self.dependency.answered()


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        url = settings.rate_limit_storage_url
        self.in_process = url == "memory://"
        self.windows = LocalWindows() if self.in_process else SharedWindows(url)
        self.defaults: dict[str, RateLimitItem] = {
            "read": parse(settings.rate_limit_read),
            "query": parse(settings.rate_limit_query),
            "ingest": parse(settings.rate_limit_ingest),
        }
        self.max_override_factor = settings.rate_limit_max_override_factor

    def probes(self) -> dict[str, Callable[[], None]]:
        """Readiness probes of the stores this limiter needs: none when it counts in-process."""
        if isinstance(self.windows, SharedWindows):
            return {"rate_limit_storage": self.windows.ping}
        return {}

    def refused_overrides(self, overrides: dict[str, str]) -> dict[str, str]:
        """{budget: why} for each per-key budget above what the server allows a key: its own
        budget times rate_limit_max_override_factor (1: a key's budget may only be lower)."""
        refused = {}
        for budget, value in overrides.items():
            server = self.defaults[budget]
            if not self._within_ceiling(parse(value), server):
                ceiling = self.max_override_factor * server.amount / server.get_expiry()
                refused[budget] = (
                    f"{value} is more than this server allows a key "
                    f"({ceiling * 60:g} requests per minute)."
                )
        return refused

    def _within_ceiling(self, item: RateLimitItem, server: RateLimitItem) -> bool:
        # Compared as rates (requests per second), so 2/second may replace 120/minute.
        return (
            item.amount * server.get_expiry()
            <= self.max_override_factor * server.amount * item.get_expiry()
        )

    def budget_item(self, budget: str, override: str | None) -> RateLimitItem:
        """The key's own budget when it has one within the ceiling, else the server's: a key
        stored before the ceiling (or a lower server budget) cannot keep a higher one."""
        server = self.defaults[budget]
        if override:
            item = parse(override)
            if self._within_ceiling(item, server):
                return item
        return server

    async def hit(self, budget: str, identity: str, override: str | None = None) -> Decision:
        item = self.budget_item(budget, override)
        if self.in_process:
            allowed, remaining, reset = self.windows.hit(item, budget, identity)
        else:  # off the event loop while the storage answers
            allowed, remaining, reset = await run_in_threadpool(
                self.windows.hit, item, budget, identity
            )
        return Decision(
            allowed=allowed,
            budget=budget,
            limit=item.amount,
            window_seconds=item.get_expiry(),
            remaining=remaining,
            reset_seconds=max(0, math.ceil(reset)),
        )
