"""Handlers of the documents tag."""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import MISSING
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from generated import models
from impl.api import conditions
from impl.api.deps import AppSettings, Service, Tenant
from impl.api.handlers import convert
from impl.api.handlers.ingestion import ingest_items, job_reply
from impl.api.inputs import BODY, PARAMS, Upload
from impl.api.responses import reply
from impl.errors import FieldError, InvalidInput
from impl.rag.types import DocumentPatch

T = TypeVar("T")


def given(value: T | object) -> T | None:
    """An optional parameter's value, or None when the client left it out."""
    return None if value is MISSING else value  # type: ignore[return-value]


async def list_documents(
    params: Annotated[models.ListDocumentsParams, PARAMS], service: Service, tenant: Tenant
) -> Response:
    page = await run_in_threadpool(
        lambda: service.list_documents(
            tenant,
            limit=params.limit,
            cursor=given(params.cursor),
            status=params.status.root if params.status is not MISSING else None,
            title_contains=given(params.title),
            created_after=given(params.created_after),
            created_before=given(params.created_before),
        )
    )
    body = models.DocumentPage(
        items=[convert.document(d) for d in page.items], next_cursor=page.next_cursor
    )
    return reply(body)


async def get_document(
    params: Annotated[models.GetDocumentParams, PARAMS],
    service: Service,
    tenant: Tenant,
    request: Request,
) -> Response:
    document = await run_in_threadpool(service.get_document, tenant, params.doc_id.root)
    etag = {"ETag": conditions.etag_header(document)}
    if conditions.not_modified(request, document):
        return Response(status_code=304, headers=etag)
    return reply(convert.document(document), headers=etag)


async def replace_document(
    params: Annotated[models.ReplaceDocumentParams, PARAMS],
    body: Annotated[models.IngestText | Upload, BODY],
    service: Service,
    tenant: Tenant,
    settings: AppSettings,
    request: Request,
) -> Response:
    [item, *more] = ingest_items(body)
    if more:
        raise InvalidInput(
            "A document is replaced by one file.",
            [FieldError("body/files", "Send exactly one file.")],
        )
    metadata = None if body.metadata is MISSING else convert.metadata(body.metadata)
    if_match = conditions.if_match(request)

    def submit() -> models.IngestResponse:
        job = service.replace_document(
            tenant, params.doc_id.root, item, metadata=metadata, if_match=if_match
        )
        if params.wait:
            job = service.wait_for_job(tenant, job.id, settings.ingest_wait_seconds)
        document = service.get_document(tenant, params.doc_id.root)
        return models.IngestResponse(job=convert.job(job), documents=[convert.document(document)])

    return job_reply(await run_in_threadpool(submit))


async def reindex_document(
    params: Annotated[models.ReindexDocumentParams, PARAMS],
    service: Service,
    tenant: Tenant,
    settings: AppSettings,
    request: Request,
) -> Response:
    if_match = conditions.if_match(request)

    def submit() -> models.IngestResponse:
        job = service.reindex_document(tenant, params.doc_id.root, if_match=if_match)
        if params.wait:
            job = service.wait_for_job(tenant, job.id, settings.ingest_wait_seconds)
        document = service.get_document(tenant, params.doc_id.root)
        return models.IngestResponse(job=convert.job(job), documents=[convert.document(document)])

    return job_reply(await run_in_threadpool(submit))


def document_patch(body: models.DocumentPatch) -> DocumentPatch:
    title = None if body.title is MISSING else body.title
    if body.metadata is MISSING:
        return DocumentPatch(title=title)
    if body.metadata is None:
        return DocumentPatch(title=title, clear_metadata=True)
    return DocumentPatch(
        title=title,
        metadata={
            key: None if value is None else convert.scalar(value)
            for key, value in body.metadata.items()
        },
    )


async def patch_document(
    params: Annotated[models.PatchDocumentParams, PARAMS],
    body: Annotated[models.DocumentPatch, BODY],
    service: Service,
    tenant: Tenant,
    request: Request,
) -> Response:
    if_match = conditions.if_match(request)
    document = await run_in_threadpool(
        lambda: service.patch_document(
            tenant, params.doc_id.root, document_patch(body), if_match=if_match
        )
    )
    return reply(convert.document(document), headers={"ETag": conditions.etag_header(document)})


async def delete_document(
    params: Annotated[models.DeleteDocumentParams, PARAMS],
    service: Service,
    tenant: Tenant,
    request: Request,
) -> Response:
    if_match = conditions.if_match(request)
    await run_in_threadpool(
        lambda: service.delete_document(tenant, params.doc_id.root, if_match=if_match)
    )
    return Response(status_code=204)


async def list_document_chunks(
    params: Annotated[models.ListDocumentChunksParams, PARAMS], service: Service, tenant: Tenant
) -> Response:
    page = await run_in_threadpool(
        lambda: service.list_chunks(
            tenant, params.doc_id.root, limit=params.limit, cursor=given(params.cursor)
        )
    )
    body = models.ChunkPage(
        items=[convert.chunk(c) for c in page.items], next_cursor=page.next_cursor
    )
    return reply(body)
