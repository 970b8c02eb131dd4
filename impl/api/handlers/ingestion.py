"""Handlers of the ingestion tag."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import MISSING
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from generated import models
from impl.api import conditions
from impl.api.deps import AppSettings, Service, Tenant
from impl.api.handlers import convert
from impl.api.inputs import BODY, PARAMS, Upload
from impl.api.responses import reply
from impl.rag.types import FINISHED_JOB_STATUSES, IngestItem


def ingest_items(body: models.IngestText | Upload) -> list[IngestItem]:
    if isinstance(body, Upload):
        metadata = convert.metadata(body.metadata)
        return [
            IngestItem(f.content, f.filename, None, metadata, f.content_type) for f in body.files
        ]
    title = None if body.title is MISSING else body.title
    return [IngestItem(body.text.encode("utf-8"), None, title, convert.metadata(body.metadata))]


def job_location(job_id: str) -> dict[str, str]:
    return {"Location": f"/api/v1/jobs/{job_id}"}


def job_reply(result: models.IngestResponse) -> Response:
    """200 once the job has finished, else 202; with the job's Location either way."""
    finished = result.job.status.root in FINISHED_JOB_STATUSES
    return reply(result, 200 if finished else 202, headers=job_location(result.job.id.root))


async def ingest_documents(
    params: Annotated[models.IngestDocumentsParams, PARAMS],
    body: Annotated[models.IngestText | Upload, BODY],
    service: Service,
    tenant: Tenant,
    settings: AppSettings,
    request: Request,
) -> Response:
    items = ingest_items(body)
    key = conditions.idempotency_key(request)

    def submit() -> models.IngestResponse:
        job = service.submit_ingest(tenant, items)
        if params.wait:
            job = service.wait_for_job(tenant, job.id, settings.ingest_wait_seconds)
        documents = [service.get_document(tenant, doc_id) for doc_id in job.document_ids]
        return models.IngestResponse(
            job=convert.job(job), documents=[convert.document(d) for d in documents]
        )

    if key is None:
        return job_reply(await run_in_threadpool(submit))
    recorded = await run_in_threadpool(service.idempotent_response, tenant, key, items)
    if recorded is not None:
        job_id = json.loads(recorded.body)["job"]["id"]
        return Response(
            recorded.body,
            status_code=recorded.status_code,
            media_type="application/json",
            headers=job_location(job_id),
        )
    try:
        response = job_reply(await run_in_threadpool(submit))
    except BaseException:
        await run_in_threadpool(service.release_idempotency_key, tenant, key)
        raise
    await run_in_threadpool(
        service.record_idempotent_response,
        tenant,
        key,
        response.status_code,
        bytes(response.body).decode(),
    )
    return response


async def get_job(
    params: Annotated[models.GetJobParams, PARAMS], service: Service, tenant: Tenant
) -> Response:
    job = await run_in_threadpool(service.get_job, tenant, params.job_id.root)
    return reply(convert.job(job))


async def list_jobs(
    params: Annotated[models.ListJobsParams, PARAMS], service: Service, tenant: Tenant
) -> Response:
    page = await run_in_threadpool(
        lambda: service.list_jobs(
            tenant,
            limit=params.limit,
            cursor=None if params.cursor is MISSING else params.cursor,
            status=None if params.status is MISSING else params.status.root,
        )
    )
    return reply(
        models.JobPage(items=[convert.job(j) for j in page.items], next_cursor=page.next_cursor)
    )


async def cancel_job(
    params: Annotated[models.CancelJobParams, PARAMS], service: Service, tenant: Tenant
) -> Response:
    job = await run_in_threadpool(service.cancel_job, tenant, params.job_id.root)
    return reply(convert.job(job))
