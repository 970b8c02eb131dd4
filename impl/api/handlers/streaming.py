"""POST /api/v1/query/stream: the answer as server-sent events; and the event stream that
every streamed operation shares."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Generator
from typing import Annotated, TypeVar

import anyio
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from generated import models
from impl.api.deps import Service, Tenant
from impl.api.handlers import convert
from impl.api.handlers.documents import given
from impl.api.inputs import BODY
from impl.api.problems import classify, problem_model, request_id
from impl.errors import RagapiError
from impl.rag.types import AnswerEvent, DoneEvent, RetrievalEvent, TokenEvent

E = TypeVar("E")


def sse(event: str, data: BaseModel) -> bytes:
    return f"event: {event}\ndata: {data.model_dump_json(by_alias=True)}\n\n".encode()


def encode(event: AnswerEvent) -> bytes:
    if isinstance(event, RetrievalEvent):
        results = [convert.search_result(hit) for hit in event.hits]
        return sse("retrieval", models.StreamRetrieval(results=results))
    if isinstance(event, TokenEvent):
        return sse("token", models.StreamToken(text=event.text))
    assert isinstance(event, DoneEvent)
    return sse("done", models.QueryResponse.model_validate(event.answer, from_attributes=True))


async def stream_query(
    body: Annotated[models.QueryRequest, BODY], service: Service, tenant: Tenant, request: Request
) -> Response:
    events = service.stream_answer(
        tenant,
        body.question,
        top_k=body.top_k,
        filters=convert.filters(body.filters),
        min_score=given(body.min_score),
        retrieval=convert.retrieval(body.retrieval),
    )
    rid = request_id(request)
    return await event_stream(events, encode, lambda exc: problem_event(exc, rid))


def problem_event(exc: RagapiError, rid: str) -> bytes:
    status, slug = classify(exc)
    return sse("error", problem_model(status, slug, exc.detail, rid))


async def event_stream(
    events: Generator[E, None, None],
    encode_event: Callable[[E], bytes],
    encode_error: Callable[[RagapiError], bytes],
) -> Response:
    """``events`` as server-sent events, each encoded by ``encode_event``; an error midway
    ends the stream with ``encode_error``'s event. The first event is awaited here, so an
    error found before the stream starts is an ordinary error response with its own status."""
    first = await run_in_threadpool(next, events)
    return StreamingResponse(
        relay(first, events, encode_event, encode_error),
        media_type="text/event-stream",
        headers={"X-Accel-Buffering": "no"},  # proxies must not hold events back
    )


async def relay(
    first: E,
    events: Generator[E, None, None],
    encode_event: Callable[[E], bytes],
    encode_error: Callable[[RagapiError], bytes],
) -> AsyncIterator[bytes]:
    """Each event is computed in a worker thread. When the client goes away Starlette cancels
    this generator; the thread running next() is waited for (anyio does not abandon it), then
    closing the generator stops the provider."""
    try:
        yield encode_event(first)
        while (event := await run_in_threadpool(next, events, None)) is not None:
            yield encode_event(event)
    except RagapiError as exc:
        yield encode_error(exc)
    finally:
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(events.close)
