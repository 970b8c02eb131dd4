"""Handlers of the documents tag."""

from __future__ import annotations

from typing import Annotated, TypeVar

from pydantic import MISSING
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from generated import models
from impl.api.deps import Service, Tenant
from impl.api.handlers import convert
from impl.api.inputs import PARAMS
from impl.api.responses import reply

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
    params: Annotated[models.GetDocumentParams, PARAMS], service: Service, tenant: Tenant
) -> Response:
    document = await run_in_threadpool(service.get_document, tenant, params.doc_id.root)
    return reply(convert.document(document))


async def delete_document(
    params: Annotated[models.DeleteDocumentParams, PARAMS], service: Service, tenant: Tenant
) -> Response:
    await run_in_threadpool(service.delete_document, tenant, params.doc_id.root)
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
