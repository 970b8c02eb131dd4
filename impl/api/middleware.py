"""Pure ASGI middleware (BaseHTTPMiddleware costs 40-70% of throughput on cheap routes).

RequestContext wraps every HTTP request: it assigns the request id, caps the body's size and
the time it may take to arrive while it streams in, adds security headers, turns any escaped
exception into a 500 problem, and records one log line and the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from impl.api.problems import internal_error, response_for_error
from impl.errors import PayloadTooLarge, RequestTimeout
from impl.observability.metrics import Metrics

log = logging.getLogger("ragapi.access")

VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
RATE_LIMIT_HEADERS = ["RateLimit", "RateLimit-Policy"]
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class RequestContext:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, max_body_bytes: int, body_timeout_seconds: float
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_seconds = body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = self.request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        response_started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                headers.extend(SECURITY_HEADERS)
                decision = scope["state"].get("rate_limit")
                if decision is not None:
                    headers.extend((k.encode(), v.encode()) for k, v in decision.headers())
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            declared = self.content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                # Refuse before reading a byte of the body.
                await self.too_large(rid, scope["path"], send_with_headers)
            else:
                await self.app(scope, self.capped(receive), send_with_headers)
        except (PayloadTooLarge, RequestTimeout) as exc:
            if not response_started:
                await response_for_error(exc, rid, scope["path"])(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error", extra={"request_id": rid})
            if not response_started:
                await internal_error(rid)(scope, receive, send_with_headers)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            operation = getattr(route, "name", None) or "unmatched"
            self.metrics.answered(operation, status, elapsed)
            if log.isEnabledFor(logging.INFO):
                principal = scope["state"].get("principal")
                # The record handed to the handlers directly: log.info would also look up the
                # caller's file and line, which no line of ragapi's shows.
                log.handle(
                    log.makeRecord(
                        log.name,
                        logging.INFO,
                        __file__,
                        0,
                        "request",
                        (),
                        None,
                        extra={
                            "request_id": rid,
                            "key_id": getattr(principal, "key_id", None),
                            "tenant": getattr(principal, "tenant", None),
                            "method": scope["method"],
                            "path": scope["path"],
                            "operation": operation,
                            "status": status,
                            "latency_ms": round(elapsed * 1000, 2),
                        },
                    )
                )

    @staticmethod
    def request_id(scope: Scope) -> str:
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given: str = value.decode("latin-1")
                if VALID_REQUEST_ID.fullmatch(given):
                    return given
        return os.urandom(16).hex()  # what uuid4().hex holds, at a fifth of the cost

    @staticmethod
    def content_length(scope: Scope) -> int | None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def capped(self, receive: Receive) -> Receive:
        """`receive`, refusing a body past max_body_bytes or still arriving
        body_timeout_seconds after the headers (a client sending a byte a second)."""
        received = 0
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_seconds

        async def receive_capped() -> Message:
            nonlocal received, body_done
            if body_done:  # later calls only wait for a disconnect, e.g. while streaming
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"The request body did not arrive within {self.body_timeout_seconds:g} s."
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise PayloadTooLarge(self.too_large_detail())
                body_done = not message.get("more_body", False)
            return message

        return receive_capped

    def too_large_detail(self) -> str:
        return f"The request body exceeds the limit of {self.max_body_bytes} bytes."

    async def too_large(self, rid: str, path: str, send: Any) -> None:
        response = response_for_error(PayloadTooLarge(self.too_large_detail()), rid, path)

        async def no_body() -> Message:
            return {"type": "http.disconnect"}

        await response({"type": "http"}, no_body, send)
