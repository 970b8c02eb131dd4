"""Readiness: every component this process uses, each probed with a deadline of its own."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from impl.errors import DependencyUnavailable

log = logging.getLogger("ragapi.readiness")

PROBE_TIMEOUT_SECONDS = 2.0

Probe = Callable[[], None]  # returns when the component works, raises when it does not


class Readiness:
    """Runs every probe at once, each in a worker thread. A probe that has not returned within
    PROBE_TIMEOUT_SECONDS counts as down, and is not started again while it still runs: a
    component that hangs holds one thread, however often readiness is asked."""

    def __init__(self, probes: Mapping[str, Probe]) -> None:
        self._probes = dict(probes)
        self._running: dict[str, asyncio.Future[None]] = {}
        self._logged_down: set[str] = set()

    async def check(self) -> dict[str, bool]:
        loop = asyncio.get_running_loop()
        for name, probe in self._probes.items():
            if name not in self._running or self._running[name].done():
                future = loop.run_in_executor(None, probe)
                # Read by _up, or by nobody when it outlived its deadline: mark it retrieved so
                # that asyncio does not log it as lost.
                future.add_done_callback(lambda done: done.cancelled() or done.exception())
                self._running[name] = future
        futures = dict(self._running)
        await asyncio.wait(futures.values(), timeout=PROBE_TIMEOUT_SECONDS)
        return {name: self._up(name, future) for name, future in futures.items()}

    def _up(self, name: str, future: asyncio.Future[None]) -> bool:
        failure: BaseException | None
        if not future.done():
            failure = TimeoutError(f"no answer within {PROBE_TIMEOUT_SECONDS:g} s")
        else:
            failure = future.exception()
        if failure is None:
            if name in self._logged_down:
                self._logged_down.discard(name)
                log.warning("readiness: %s is up again", name)
            return True
        # A store's own client logs its outages (impl.dependencies); any other failure is
        # logged here, once, when the component goes down.
        if name not in self._logged_down and not isinstance(failure, DependencyUnavailable):
            self._logged_down.add(name)
            log.error("readiness: %s is down (%s: %s)", name, type(failure).__name__, failure)
        return False
