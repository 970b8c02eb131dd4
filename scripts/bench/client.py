"""A small HTTP/1.1 client on asyncio streams, one keep-alive connection per simulated client.

Every HTTP figure of the benchmark goes through it, the full stack's and the bare app's alike.
It costs a few tens of microseconds of CPU per request, where httpx costs several hundred: on a
2-core machine the client shares the cores with the server, and a heavy client would be
measured as the server's slowness.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

_HEADER_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self._host = host
        self._port = port
        fixed = {"Host": f"{host}:{port}", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            await writer.wait_closed()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        content_type: str = "application/json",
    ) -> Response:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams
        head = f"{method} {path} HTTP/1.1\r\n{self._fixed}"
        if body or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        try:
            status, headers = _parse_head(await reader.readuntil(_HEADER_END))
            if headers.get("transfer-encoding") == "chunked":
                payload = await _read_chunked(reader)
            else:
                payload = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            await self.close()  # a half-read response leaves the stream out of step
            raise
        if headers.get("connection") == "close":
            await self.close()
        return Response(status, payload)

    async def post_json(self, path: str, payload: Any) -> Response:
        return await self.request("POST", path, json.dumps(payload).encode())


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
    return status, headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def multipart(files: Sequence[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of ``files`` fields, and its content type."""
    boundary = "ragapi-bench-boundary-7d3f0c"
    parts = []
    for name, content in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"'
            f"\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


Call = Callable[[Connection, int], Any]  # (connection, request number) -> awaitable Response


async def load(
    host: str,
    port: int,
    headers: dict[str, str],
    call: Call,
    *,
    clients: int,
    seconds: float | None = None,
    requests: int | None = None,
    until: Callable[[], bool] | None = None,
) -> LoadResult:
    """``clients`` connections sending ``call`` back to back, until ``seconds`` have passed,
    ``requests`` have been sent, or ``until()`` is true. Completed requests count toward the
    rate and the latencies; a non-2xx status or a transport failure is an error."""
    result = LoadResult()
    sent = 0
    deadline = None if seconds is None else time.perf_counter() + seconds

    def more() -> bool:
        if requests is not None and sent >= requests:
            return False
        if deadline is not None and time.perf_counter() >= deadline:
            return False
        return until is None or not until()

    async def client() -> None:
        nonlocal sent
        connection = Connection(host, port, headers)
        try:
            while more():
                number = sent
                sent += 1
                started = time.perf_counter()
                try:
                    response = await call(connection, number)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    result.errors += 1
                    continue
                if 200 <= response.status < 300:
                    result.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    result.errors += 1
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.seconds = time.perf_counter() - started
    return result
