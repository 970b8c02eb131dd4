"""uvicorn's HTTP protocol with a deadline for each request's line and headers.

uvicorn bounds the idle time between requests (keep-alive) but not the time a client takes to
send the headers of one, so a client sending a byte a second holds its connection for as long
as it likes, and a few thousand such clients hold the server. The body's deadline is the
RequestContext middleware's (a 408 problem); headers come before there is a request to answer,
so here the connection is closed.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from impl.settings import Settings


class HeaderTimeoutProtocol(HttpToolsProtocol):
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The first request's deadline runs from the connection, not from its first byte;
        # a later one's from its first byte (keep-alive bounds the wait before it).
        if self._header_deadline is None:
            self._start_header_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _start_header_deadline(self) -> None:
        # The lifespan put the app's settings in the state uvicorn hands every connection.
        settings: Settings = self.app_state["settings"]
        self._header_deadline = self.loop.call_later(
            settings.header_timeout_seconds, self._headers_too_slow
        )

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
