"""Handlers of the health tag."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from generated import models
from impl.api.deps import Service
from impl.api.responses import reply


async def get_health() -> Response:
    return reply(models.Health(status="ok"))


async def get_readiness(service: Service) -> Response:
    states = await run_in_threadpool(service.readiness)
    ready = all(states.values())
    body = models.Readiness(
        status="ready" if ready else "not_ready",
        components=models.Components.model_validate(
            {name: "up" if up else "down" for name, up in states.items()}
        ),
    )
    return reply(body, 200 if ready else 503)
