"""The WebSocket /api/v1/ws: the events of jobs, and of every document of the tenant, pushed as
they are written to the registry's event log (the protocol is described in the contract's
`ingestion` tag, since OpenAPI cannot describe a WebSocket).

Three tasks share a connection: one reads the client's messages (its subscriptions), one reads
the log every poll interval, one sends. Between the last two sits a bounded buffer: a client
that reads more slowly than events come fills it, and is then closed with code 4008 rather than
holding the server's memory without bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocket, WebSocketDisconnect

from impl.api.handlers import convert
from impl.api.security import DEFAULT_TENANT, Principal, verify_key
from impl.errors import Forbidden, NotFound, RagapiError, Unauthenticated
from impl.rag.events import Event
from impl.rag.service import EVENT_PAGE_SIZE, RagService
from impl.settings import Settings

PATH = "/api/v1/ws"
# Close codes (4000-4999 are the application's, RFC 6455 7.4.2), mirroring HTTP's statuses.
CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_SLOW = 4008
CLOSE_BAD_MESSAGE = 1008  # policy violation: a message the protocol does not have
AUTH_WAIT_SECONDS = 10.0
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_JOBS = 100  # jobs one connection follows


class _Close(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class _Subscription:
    """What the connection follows, and the id of the last event it has queued."""

    tenant: str
    cursor: int
    jobs: set[str] = field(default_factory=set)
    documents_after: int | None = None  # the tenant's document events after this id
    subscribed: bool = False

    @property
    def documents(self) -> bool:
        return self.documents_after is not None

    def has(self, event: Event) -> bool:
        """Whether the subscription as it stands has sent, or will send, the event."""
        if event.job_id in self.jobs:
            return True
        after = self.documents_after
        return after is not None and event.type.startswith("document.") and (event.id or 0) > after


def _compact(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def event_message(event: Event) -> str:
    return f'{{"type":"event","event":{convert.job_event(event).model_dump_json()}}}'


async def serve_events(websocket: WebSocket) -> None:
    await websocket.accept()
    settings: Settings = websocket.state.settings
    service: RagService = websocket.state.service
    try:
        principal = await _authenticate(websocket, settings)
    except (Unauthenticated, Forbidden) as exc:
        code = CLOSE_FORBIDDEN if isinstance(exc, Forbidden) else CLOSE_UNAUTHENTICATED
        await websocket.close(code, exc.detail[:120])
        return
    except _Close as exc:
        await websocket.close(exc.code, exc.reason)
        return
    except WebSocketDisconnect:
        return
    await websocket.send_json({"type": "ready", "tenant": principal.tenant})
    subscription = _Subscription(principal.tenant, await run_in_threadpool(service.last_event_id))
    outbox, inbox = anyio.create_memory_object_stream[str](settings.ws_buffer_events)
    lock = anyio.Lock()  # a subscription and a poll never interleave: one cursor
    last_sent = [time.monotonic()]
    closing: _Close | None = None

    async def run(task: Any) -> None:
        nonlocal closing
        try:
            await task()
        except _Close as exc:
            closing = exc
        except WebSocketDisconnect:
            pass
        except RagapiError as exc:  # the registry stopped answering: the client reconnects
            closing = _Close(1011, exc.detail[:120])
        group.cancel_scope.cancel()

    async def receive() -> None:
        while True:
            message = _parse(await _receive_text(websocket))
            await _subscribe(service, subscription, message, outbox, lock)

    async def poll() -> None:
        while True:
            async with lock:
                more = await _deliver(service, subscription, outbox, settings.ws_buffer_events)
            if time.monotonic() - last_sent[0] >= settings.events_heartbeat_seconds:
                _queue(outbox, '{"type":"heartbeat"}')
                last_sent[0] = time.monotonic()
            await anyio.sleep(0 if more else settings.events_poll_seconds)

    async def send() -> None:
        async for message in inbox:
            await websocket.send_text(message)
            last_sent[0] = time.monotonic()

    async with anyio.create_task_group() as group:
        group.start_soon(run, receive)
        group.start_soon(run, poll)
        group.start_soon(run, send)
    if closing is not None:
        # The close frame goes after the events already written, once the client has read
        # them; a client that never reads is dropped by the server's keepalive pings.
        with contextlib.suppress(WebSocketDisconnect, OSError):
            await websocket.close(closing.code, closing.reason)


async def _authenticate(websocket: WebSocket, settings: Settings) -> Principal:
    """The key of the upgrade request's X-API-Key header, else of the first message."""
    if not settings.auth_enabled:
        return Principal(None, DEFAULT_TENANT, {})
    presented = websocket.headers.get("x-api-key", "").strip(" \t")
    if not presented:
        with anyio.move_on_after(AUTH_WAIT_SECONDS):
            message = _parse(await _receive_text(websocket))
            if message.get("type") != "auth" or not isinstance(message.get("api_key"), str):
                raise Unauthenticated(
                    'Send the API key in the X-API-Key header or first: {"type": "auth", '
                    '"api_key": "..."}.'
                )
            presented = message["api_key"]
        if not presented:
            raise Unauthenticated("No API key came within 10 s.")
    return await verify_key(websocket.state.keys, presented, "read")


async def _receive_text(websocket: WebSocket) -> str:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise _Close(CLOSE_BAD_MESSAGE, "each message must be JSON text, not binary")
    return str(text)


def _parse(text: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise _Close(CLOSE_BAD_MESSAGE, "each message must be a JSON object")
    return message


def _queue(outbox: MemoryObjectSendStream[str], message: str) -> None:
    try:
        outbox.send_nowait(message)
    except anyio.WouldBlock:
        raise _Close(CLOSE_TOO_SLOW, "too slow: events were not read in time") from None


async def _deliver(
    service: RagService,
    subscription: _Subscription,
    outbox: MemoryObjectSendStream[str],
    capacity: int,
) -> bool:
    """Queue the subscription's new events, as many as the buffer has room for; True when more
    may be waiting. A buffer still full one poll interval after it was filled is a client
    that does not keep up: closed."""
    if not (subscription.jobs or subscription.documents):
        return False
    room = capacity - outbox.statistics().current_buffer_used
    if room == 0:
        raise _Close(CLOSE_TOO_SLOW, "too slow: events were not read in time")
    events = await run_in_threadpool(_newer, service, subscription, min(room, EVENT_PAGE_SIZE))
    for event in events:
        _queue(outbox, event_message(event))
        subscription.cursor = event.id or subscription.cursor
    return len(events) == EVENT_PAGE_SIZE and room > EVENT_PAGE_SIZE


def _newer(service: RagService, subscription: _Subscription, limit: int) -> list[Event]:
    return service.tenant_events(
        subscription.tenant,
        after=subscription.cursor,
        job_ids=subscription.jobs,
        documents=subscription.documents,
        limit=limit,
    )


async def _subscribe(
    service: RagService,
    subscription: _Subscription,
    message: dict[str, Any],
    outbox: MemoryObjectSendStream[str],
    lock: anyio.Lock,
) -> None:
    """Add the message's jobs and documents to the subscription, then queue the new jobs'
    events up to the cursor (those after it come with the next poll). These wait for room in
    the buffer: a client that subscribes is sent what it asked for at its own pace."""
    jobs, documents, after = message.get("jobs", []), message.get("documents", False), None
    if message.get("type") != "subscribe" or set(message) - {"type", "jobs", "documents", "after"}:
        raise _Close(CLOSE_BAD_MESSAGE, 'expected {"type": "subscribe", ...}')
    if not isinstance(jobs, list) or not all(
        isinstance(job, str) and _JOB_ID.fullmatch(job) for job in jobs
    ):
        raise _Close(CLOSE_BAD_MESSAGE, "jobs must be a list of job ids")
    if not isinstance(documents, bool):
        raise _Close(CLOSE_BAD_MESSAGE, "documents must be true or false")
    if "after" in message:
        after = message["after"]
        if subscription.subscribed or not isinstance(after, int) or after < 0:
            raise _Close(CLOSE_BAD_MESSAGE, "after: an event id, in the first subscription only")
    if len(subscription.jobs | set(jobs)) > MAX_JOBS:
        raise _Close(CLOSE_BAD_MESSAGE, f"a connection follows at most {MAX_JOBS} jobs")
    async with lock:
        if after is not None:
            subscription.cursor = after
        new = []
        for job_id in dict.fromkeys(jobs):
            if job_id in subscription.jobs:
                continue
            try:
                await run_in_threadpool(service.get_job, subscription.tenant, job_id)
            except NotFound as exc:
                await outbox.send(_compact({"type": "error", "detail": exc.detail}))
                continue
            new.append(job_id)
        known = dataclasses.replace(subscription, jobs=set(subscription.jobs))
        subscription.jobs.update(new)
        if documents and not subscription.documents:
            subscription.documents_after = subscription.cursor
        subscription.subscribed = True
        confirmation = {
            "type": "subscribed",
            "jobs": sorted(subscription.jobs),
            "documents": subscription.documents,
        }
        await outbox.send(_compact(confirmation))
        # The new jobs' events up to the cursor now; later ones come in order with the rest.
        floor = subscription.cursor if after is not None else 0
        while new and floor < subscription.cursor:
            earlier = await run_in_threadpool(
                _earlier, service, subscription.tenant, new, floor, subscription.cursor
            )
            for event in earlier:
                if not known.has(event):  # a document event the subscription already sent
                    await outbox.send(event_message(event))
            if len(earlier) < EVENT_PAGE_SIZE:
                break
            floor = earlier[-1].id or floor


def _earlier(
    service: RagService, tenant: str, jobs: list[str], after: int, up_to: int
) -> list[Event]:
    return service.tenant_events(tenant, after=after, job_ids=jobs, documents=False, up_to=up_to)
