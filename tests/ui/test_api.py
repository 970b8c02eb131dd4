"""The UI's client of the API (ui/api.py) following a job whose event stream drops: through a
loopback proxy in front of the live server that cuts each event stream after a few bytes, as a
flaky network or proxy does."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import httpx
import pytest

from generated.client.models import Job
from tests.conftest import Server, create_key
from tests.ui.test_app import requests_for
from ui.api import RESUMES, connect, follow_job

HEADERS_END = b"\r\n\r\n"


class CuttingProxy:
    """Forwards loopback connections to the server. A connection whose first request asks
    for an event stream gets the response's headers and `body_bytes` of its body, then is
    closed on both sides; every other connection passes whole."""

    def __init__(self, server_url: str, body_bytes: int) -> None:
        self.target = httpx.URL(server_url)
        self.body_bytes = body_bytes
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection((self.target.host, self.target.port or 80))
        with client, upstream:
            try:
                self.forward(client, upstream)
            finally:
                # Not just closed: a thread blocked reading a closed socket keeps it open.
                for side in (client, upstream):
                    with suppress(OSError):
                        side.shutdown(socket.SHUT_RDWR)

    def forward(self, client: socket.socket, upstream: socket.socket) -> None:
        request = client.recv(65536)
        request_line = request.split(b"\r\n", 1)[0]
        cut = request_line.split(b" ")[1].endswith(b"/events")
        upstream.sendall(request)
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        budget = self.body_bytes if cut else None
        head: bytes | None = b""  # the response until the end of its headers; then None
        while data := upstream.recv(65536):
            if budget is None:
                client.sendall(data)
                continue
            if head is not None:
                head += data
                if HEADERS_END not in head:
                    continue
                headers, data = head.split(HEADERS_END, 1)
                client.sendall(headers + HEADERS_END)
                head = None
            client.sendall(data[:budget])
            budget -= len(data)
            if budget <= 0:
                return  # the stream cut: both sides closed

    def close(self) -> None:
        self.listener.close()


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass  # the other side closed the connection


@pytest.fixture(scope="module")
def api_key(server: Server) -> str:
    return create_key(server, "ui-events", "read,write")


@contextmanager
def proxy(server: Server, body_bytes: int) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(server.url, body_bytes)
    yield cutting
    cutting.close()


def submit(server: Server, api_key: str, text: str) -> Job:
    with server.client(api_key) as http:
        response = http.post("/api/v1/ingest", json={"text": text})
        assert response.status_code == 202, response.text
        return Job.from_dict(response.json()["job"])


def all_event_ids(server: Server, api_key: str, job_id: str) -> list[str]:
    """The ids of the job's whole stream, read in one go once it has finished."""
    events = f"/api/v1/jobs/{job_id}/events"
    with server.client(api_key) as http, http.stream("GET", events) as response:
        return [line[4:] for line in response.iter_lines() if line.startswith("id: ")]


def test_a_dropped_event_stream_is_resumed_where_it_stopped(server: Server, api_key: str) -> None:
    label = uuid.uuid4().hex
    # About 70 passages: a job that reports progress three times.
    text = " ".join(f"Harbour log {label} entry {i}: the tug met tanker {i}." for i in range(800))
    job = submit(server, api_key, text)
    # One or two events get through each connection (each is under 600 bytes).
    with proxy(server, body_bytes=600) as cutting:
        seen: list[tuple[str | None, str, int]] = []
        with connect(cutting.url, api_key) as client:
            finished = follow_job(
                client, job, lambda j, last: seen.append((last, j.status, j.chunks_done))
            )
    assert finished.status == "succeeded"
    assert finished.chunks_done == finished.chunks_total > 64
    # Every event once, in order, as the uncut stream has them.
    assert [last for last, _, _ in seen] == all_event_ids(server, api_key, job.id)
    assert [done for _, _, done in seen] == sorted(done for _, _, done in seen)
    requests = requests_for(server, f"/api/v1/jobs/{job.id}/events")
    assert requests["streamJobEvents"] > 3
    assert requests_for(server, f"/api/v1/jobs/{job.id}") == {}


def test_a_stream_that_keeps_dropping_gives_way_to_one_read_of_the_job(
    server: Server, api_key: str
) -> None:
    job = submit(server, api_key, f"Lighthouse {uuid.uuid4().hex} guides ships at night.")
    # No event ever gets through.
    with proxy(server, body_bytes=0) as cutting, connect(cutting.url, api_key) as client:
        found = follow_job(client, job, lambda j, last: pytest.fail("no event came"))
    assert found.id == job.id and found.status in ("queued", "running", "succeeded")
    assert requests_for(server, f"/api/v1/jobs/{job.id}/events") == {"streamJobEvents": RESUMES + 1}
    assert requests_for(server, f"/api/v1/jobs/{job.id}") == {"getJob": 1}
