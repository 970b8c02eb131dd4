"""Handlers of the operations tag."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from impl.api.deps import AppMetrics, Service, Tenant
from impl.api.handlers import convert
from impl.api.handlers.ingestion import job_location
from impl.api.responses import reply


async def get_metrics(metrics: AppMetrics) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def reindex_tenant(service: Service, tenant: Tenant) -> Response:
    index = await run_in_threadpool(service.reindex_tenant, tenant)
    follow = job_location(index.job.id) if index.job else {"Location": "/api/v1/reindex"}
    return reply(convert.tenant_index(index), 202, headers=follow)


async def get_tenant_index(service: Service, tenant: Tenant) -> Response:
    return reply(convert.tenant_index(await run_in_threadpool(service.tenant_index, tenant)))
