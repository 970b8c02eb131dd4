"""Handlers of the operations tag."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from impl.api.deps import AppMetrics


async def get_metrics(metrics: AppMetrics) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
