"""Handlers of the health tag."""

from __future__ import annotations

from starlette.responses import Response

from generated import models
from impl.api.deps import ReadinessProbes
from impl.api.responses import reply


async def get_health() -> Response:
    return reply(models.Health(status="ok"))


async def get_readiness(readiness: ReadinessProbes) -> Response:
    states = await readiness.check()
    ready = all(states.values())
    body = models.Readiness(
        status="ready" if ready else "not_ready",
        components=models.Components.model_validate(
            {name: "up" if up else "down" for name, up in states.items()}
        ),
    )
    return reply(body, 200 if ready else 503)
