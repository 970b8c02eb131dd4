"""The stores a process depends on (registry, vector store, rate-limit storage, originals), as
requests and probes see them.

Each store's client reports every failure to reach it and every answer to its ``Dependency``.
A failure becomes one ``DependencyUnavailable`` (a 503 with Retry-After for the client), and
the log says so once when an outage starts and once when it ends, not once per request.
"""

from __future__ import annotations

import logging
import threading

from impl.errors import DependencyUnavailable

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5


class Dependency:
    """One store, named for the log (``name``, with its address but never a password) and for
    the client (``label``: what the 503's detail calls it). Safe to share between threads."""

    def __init__(self, label: str, name: str) -> None:
        self.label = label
        self.name = name
        self._up = True
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        """Whether the last call answered."""
        return self._up

    def failed(self, exc: BaseException) -> DependencyUnavailable:
        """Record a failure to reach the store; the error to raise instead of ``exc``."""
        with self._lock:
            starts = self._up
            self._up = False
        if starts:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            log.error(
                "%s is unreachable (%s: %s); requests that need it answer 503 until it is back",
                self.name,
                type(exc).__name__,
                reason,
            )
        return DependencyUnavailable(
            f"The {self.label} does not answer; retry shortly.", RETRY_AFTER_SECONDS
        )

    def answered(self) -> None:
        """Record an answer from the store (cheap when it was up already)."""
        if self._up:
            return
        with self._lock:
            ends = not self._up
            self._up = True
        if ends:
            log.warning("%s is reachable again", self.name)
