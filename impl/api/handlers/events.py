"""GET /api/v1/jobs/{job_id}/events: a job's events as server-sent events, read from the
registry's event log (so whichever process runs the job, every API process can stream it)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from generated import models
from impl.api.deps import AppSettings, Service, Tenant
from impl.api.handlers import convert
from impl.api.handlers.streaming import problem_event
from impl.api.inputs import PARAMS
from impl.api.problems import request_id
from impl.errors import FieldError, InvalidInput, RagapiError
from impl.rag.events import Event, JobEvents
from impl.rag.service import EVENT_PAGE_SIZE, RagService
from impl.settings import Settings

_EVENT_ID = re.compile(r"0|[1-9][0-9]{0,17}")
HEARTBEAT = b": heartbeat\n\n"


def last_event_id(request: Request) -> int:
    """The Last-Event-ID header as an event id; 0 (from the first event) without it."""
    raw = request.headers.get("Last-Event-ID")
    if raw is None:
        return 0
    if not _EVENT_ID.fullmatch(raw):
        raise InvalidInput(
            "Last-Event-ID must be the id of an event received",
            [FieldError("header/Last-Event-ID", "Not an event id.")],
        )
    return int(raw)


def encode_event(event: Event) -> bytes:
    data = convert.job_event(event).model_dump_json()
    named = f"event: {event.type}\ndata: {data}\n\n"
    return (named if event.id is None else f"id: {event.id}\n{named}").encode()


def read_events(service: RagService, tenant: str, job_id: str, after: int) -> JobEvents:
    return service.job_events(tenant, job_id, after=after)


async def stream_job_events(
    params: Annotated[models.StreamJobEventsParams, PARAMS],
    service: Service,
    tenant: Tenant,
    settings: AppSettings,
    request: Request,
) -> Response:
    job_id = params.job_id.root
    after = last_event_id(request)
    # Read before the stream starts: an unknown job is an ordinary 404.
    first = await run_in_threadpool(read_events, service, tenant, job_id, after)
    return StreamingResponse(
        follow(service, settings, tenant, job_id, after, first, request_id(request)),
        media_type="text/event-stream",
        headers={"X-Accel-Buffering": "no"},  # proxies must not hold events back
    )


async def follow(
    service: RagService,
    settings: Settings,
    tenant: str,
    job_id: str,
    after: int,
    batch: JobEvents,
    rid: str,
) -> AsyncIterator[bytes]:
    """Send each page of events, then read the log again every poll interval, until the job's
    last event; a heartbeat comment after a silence. Starlette cancels this when the client
    goes away."""
    last_sent = time.monotonic()
    while True:
        for event in batch.events:
            yield encode_event(event)
            after = event.id or after
        if batch.finished:
            return
        if batch.events:
            last_sent = time.monotonic()
        elif time.monotonic() - last_sent >= settings.events_heartbeat_seconds:
            yield HEARTBEAT
            last_sent = time.monotonic()
        if len(batch.events) < EVENT_PAGE_SIZE:  # else more are waiting: read them at once
            await anyio.sleep(settings.events_poll_seconds)
        try:
            batch = await run_in_threadpool(read_events, service, tenant, job_id, after)
        except RagapiError as exc:
            yield problem_event(exc, rid)
            return
