"""Rate limits with the `limits` library: one budget per kind of work (cheap reads, queries,
ingestion), counted per key, storage named by URL (memory:// in one process, redis:// for
several)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from impl.settings import Settings


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


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.storage = storage_from_string(settings.rate_limit_storage_url)
        self.strategy = MovingWindowRateLimiter(self.storage)
        self.defaults: dict[str, RateLimitItem] = {
            "read": parse(settings.rate_limit_read),
            "query": parse(settings.rate_limit_query),
            "ingest": parse(settings.rate_limit_ingest),
        }

    def hit(self, budget: str, identity: str, override: str | None = None) -> Decision:
        item = parse(override) if override else self.defaults[budget]
        allowed = self.strategy.hit(item, budget, identity)
        stats = self.strategy.get_window_stats(item, budget, identity)
        return Decision(
            allowed=allowed,
            budget=budget,
            limit=item.amount,
            window_seconds=item.get_expiry(),
            remaining=stats.remaining,
            reset_seconds=max(0, math.ceil(stats.reset_time - time.time())),
        )
