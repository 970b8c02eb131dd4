"""Handlers of the ingestion tag."""

from __future__ import annotations

from typing import Annotated

from pydantic import MISSING
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from generated import models
from impl.api.deps import AppSettings, Service, Tenant
from impl.api.handlers import convert
from impl.api.inputs import BODY, PARAMS, Upload
from impl.api.responses import reply
from impl.rag.types import IngestItem


def ingest_items(body: models.IngestText | Upload) -> list[IngestItem]:
    if isinstance(body, Upload):
        metadata = convert.metadata(body.metadata)
        return [
            IngestItem(f.content, f.filename, None, metadata, f.content_type) for f in body.files
        ]
    title = None if body.title is MISSING else body.title
    return [IngestItem(body.text.encode("utf-8"), None, title, convert.metadata(body.metadata))]


async def ingest_documents(
    params: Annotated[models.IngestDocumentsParams, PARAMS],
    body: Annotated[models.IngestText | Upload, BODY],
    service: Service,
    tenant: Tenant,
    settings: AppSettings,
) -> Response:
    def submit() -> models.IngestResponse:
        job = service.submit_ingest(tenant, ingest_items(body))
        if params.wait:
            job = service.wait_for_job(tenant, job.id, settings.ingest_wait_seconds)
        documents = [service.get_document(tenant, doc_id) for doc_id in job.document_ids]
        return models.IngestResponse(
            job=convert.job(job), documents=[convert.document(d) for d in documents]
        )

    result = await run_in_threadpool(submit)
    finished = result.job.status.root in ("succeeded", "failed")
    status = 200 if params.wait and finished else 202
    return reply(result, status, headers={"Location": f"/api/v1/jobs/{result.job.id.root}"})


async def get_job(
    params: Annotated[models.GetJobParams, PARAMS], service: Service, tenant: Tenant
) -> Response:
    job = await run_in_threadpool(service.get_job, tenant, params.job_id.root)
    return reply(convert.job(job))
