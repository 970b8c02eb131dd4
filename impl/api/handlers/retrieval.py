"""Handlers of the retrieval tag."""

from __future__ import annotations

from typing import Annotated

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from generated import models
from impl.api.deps import Service, Tenant
from impl.api.handlers import convert
from impl.api.handlers.documents import given
from impl.api.inputs import BODY
from impl.api.responses import reply


async def search_chunks(
    body: Annotated[models.SearchRequest, BODY], service: Service, tenant: Tenant
) -> Response:
    search_filters = convert.filters(body.filters)
    hits = await run_in_threadpool(
        lambda: service.search(
            tenant,
            body.query,
            top_k=body.top_k,
            filters=search_filters,
            min_score=given(body.min_score),
            retrieval=convert.retrieval(body.retrieval),
        )
    )
    results = [convert.search_result(hit) for hit in hits]
    return reply(models.SearchResponse(results=results))


async def query_documents(
    body: Annotated[models.QueryRequest, BODY], service: Service, tenant: Tenant
) -> Response:
    search_filters = convert.filters(body.filters)
    answer = await run_in_threadpool(
        lambda: service.answer(
            tenant,
            body.question,
            top_k=body.top_k,
            filters=search_filters,
            min_score=given(body.min_score),
            retrieval=convert.retrieval(body.retrieval),
        )
    )
    return reply(models.QueryResponse.model_validate(answer, from_attributes=True))
