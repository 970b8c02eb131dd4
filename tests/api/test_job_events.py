"""Job events, pushed: one job's server-sent events and the WebSocket /api/v1/ws, against a real
server (embedded Chroma, the packaged embedding model), and `ragapi jobs watch` on the same
registry from another process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from tests.conftest import ROOT, UNLIMITED, Server, create_key, start_server

API = "/api/v1"
MERGE_PATCH = {"content-type": "application/merge-patch+json"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A small WebSocket buffer and quick polls and heartbeats, so that a slow reader is found
    # after a few events and a heartbeat comes within a test's patience.
    running = start_server(
        tmp_path_factory.mktemp("events") / "data",
        ws_buffer_events="4",
        events_poll_seconds="0.1",
        events_heartbeat_seconds="1",
        **UNLIMITED,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(stack: Server) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


@dataclass(frozen=True)
class Sse:
    id: str | None
    event: str
    data: dict[str, Any]


def read_sse(response: httpx.Response) -> Iterator[Sse | None]:
    """The stream's events; None for each heartbeat comment."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            yield None
        elif line:
            name, _, value = line.partition(": ")
            fields[name] = value
        elif fields:
            yield Sse(fields.get("id"), fields["event"], json.loads(fields["data"]))
            fields = {}


def stream(
    http: httpx.Client, job_id: str, *, last_id: str | None = None, stop_after: int | None = None
) -> list[Sse]:
    """The job's events until the server ends the stream, or the first ``stop_after``."""
    headers = {} if last_id is None else {"Last-Event-ID": last_id}
    received: list[Sse] = []
    with http.stream("GET", f"{API}/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for item in read_sse(response):
            if item is not None:
                received.append(item)
                if len(received) == stop_after:
                    break
    return received


def long_text(label: str, sentences: int = 800) -> str:
    """About 70 chunks: a job of three batches, so that it reports progress more than once."""
    return " ".join(
        f"Harbour log {label} entry {i}: the pilot boat met tanker {i % 37} at the outer buoy."
        for i in range(sentences)
    )


def submit(http: httpx.Client, text: str, **fields: Any) -> str:
    response = http.post(f"{API}/ingest", json={"text": text, **fields})
    assert response.status_code == 202, response.text
    return str(response.json()["job"]["id"])


def ws_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + f"{API}/ws"


def receive(ws: ClientConnection) -> dict[str, Any]:
    """The next message that is not a heartbeat."""
    while True:
        message: dict[str, Any] = json.loads(ws.recv(timeout=120))
        if message["type"] != "heartbeat":
            return message


def job_events_over_ws(ws: ClientConnection, job_id: str) -> list[dict[str, Any]]:
    """The job's events as the socket sends them, up to its job.finished."""
    events = []
    while True:
        message = receive(ws)
        assert message["type"] == "event", message
        if message["event"]["job_id"] == job_id:
            events.append(message["event"])
            if message["event"]["type"] == "job.finished":
                return events


def test_sse_sends_a_jobs_events_in_order_and_resumes_after_a_reconnect(
    http: httpx.Client,
) -> None:
    job_id = submit(http, long_text(uuid.uuid4().hex))
    # A client that goes away after three events, then comes back with the last id it saw.
    first = stream(http, job_id, stop_after=3)
    rest = stream(http, job_id, last_id=first[-1].id)
    assert rest[-1].event == "job.finished"
    # Read again from the start once the job is over: the same events, none missed or twice.
    whole = stream(http, job_id)
    assert [(e.id, e.event, e.data) for e in first + rest] == [
        (e.id, e.event, e.data) for e in whole
    ]

    ids = [int(e.id or 0) for e in whole]
    assert ids == sorted(set(ids)) and ids[0] > 0
    for event in whole:
        assert event.data["id"] == int(event.id or 0)
        assert event.data["type"] == event.event
        assert event.data["job_id"] == job_id
    kinds = [e.event for e in whole]
    assert kinds[:2] == ["job.queued", "job.running"]
    assert kinds[-2:] == ["document.ready", "job.finished"]
    assert set(kinds[2:-2]) == {"job.progress"}
    progress = [
        (e.data["data"]["chunks_done"], e.data["data"]["chunks_total"]) for e in whole[2:-2]
    ]
    total = progress[-1][1]
    assert total > 64 and len(progress) >= 4  # the start and one per batch of 32 chunks
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)
    assert progress[-1] == (total, total)
    ready, finished = whole[-2].data, whole[-1].data
    assert ready["data"] == {"version": 1, "chunk_count": total}
    assert finished["data"] == {"status": "succeeded", "error": None}
    job = http.get(f"{API}/jobs/{job_id}").json()
    assert ready["document_id"] == job["document_ids"][0] and job["chunks_done"] == total
    # After the last event there is nothing more: the stream ends at once.
    assert stream(http, job_id, last_id=whole[-1].id) == []


def test_sse_refuses_another_tenants_job_and_a_malformed_last_event_id(
    stack: Server, http: httpx.Client
) -> None:
    job_id = submit(http, f"A note for the default tenant only: {uuid.uuid4().hex}.")
    other = create_key(stack, "events-other", "read,write")
    with stack.client(other) as outsider:
        refused = outsider.get(f"{API}/jobs/{job_id}/events")
    assert refused.status_code == 404
    assert refused.headers["content-type"] == "application/problem+json"
    bad = http.get(f"{API}/jobs/{job_id}/events", headers={"Last-Event-ID": "soon"})
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["location"] == "header/Last-Event-ID"


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that only queues jobs (no ingestion threads): its jobs wait until cancelled."""
    running = start_server(
        tmp_path_factory.mktemp("idle") / "data",
        ingest_workers="0",
        events_poll_seconds="0.1",
        events_heartbeat_seconds="0.5",
        **UNLIMITED,
    )
    yield running
    running.stop()


def test_sse_sends_heartbeats_while_a_job_waits(idle: Server) -> None:
    with idle.client() as client:
        job_id = submit(client, f"Nothing runs this job: {uuid.uuid4().hex}.")
        beats, events = 0, []
        with client.stream("GET", f"{API}/jobs/{job_id}/events") as response:
            for item in read_sse(response):
                if item is None:
                    beats += 1
                    if beats == 3:
                        break
                else:
                    events.append(item.event)
    assert events == ["job.queued"]


def test_websocket_pushes_job_and_document_events_and_resumes_after(
    stack: Server, http: httpx.Client
) -> None:
    with connect(ws_url(stack), additional_headers={"X-API-Key": stack.api_key}) as ws:
        assert receive(ws) == {"type": "ready", "tenant": "default"}
        ws.send(json.dumps({"type": "subscribe", "documents": True}))
        assert receive(ws) == {"type": "subscribed", "jobs": [], "documents": True}
        job_id = submit(http, long_text(uuid.uuid4().hex, sentences=400))
        ws.send(json.dumps({"type": "subscribe", "jobs": [job_id]}))
        assert receive(ws) == {"type": "subscribed", "jobs": [job_id], "documents": True}
        pushed = job_events_over_ws(ws, job_id)
        # A change by PATCH is a document event of the tenant, with no job.
        document_id = pushed[-2]["document_id"]
        patched = http.patch(
            f"{API}/documents/{document_id}", json={"title": "Harbour log"}, headers=MERGE_PATCH
        )
        assert patched.status_code == 200, patched.text
        update = receive(ws)["event"]
        assert update["type"] == "document.updated" and update["job_id"] is None
        assert update["data"] == {"version": 1, "title": "Harbour log", "metadata": {}}

    # The same JSON as the server-sent events' data, in the same order, each once (the
    # document.ready came by both subscriptions, and was sent once).
    assert pushed == [event.data for event in stream(http, job_id)]

    # A client that reconnects with the last id it received gets what came after it.
    with connect(ws_url(stack), additional_headers={"X-API-Key": stack.api_key}) as ws:
        receive(ws)
        after = pushed[2]["id"]
        ws.send(json.dumps({"type": "subscribe", "jobs": [job_id], "after": after}))
        receive(ws)
        assert job_events_over_ws(ws, job_id) == pushed[3:]


def test_websocket_takes_the_key_in_the_first_message_and_refuses_other_tenants_jobs(
    stack: Server, http: httpx.Client
) -> None:
    job_id = submit(http, f"Another note for the default tenant: {uuid.uuid4().hex}.")
    other = create_key(stack, "events-ws-other", "read")
    with connect(ws_url(stack)) as ws:
        ws.send(json.dumps({"type": "auth", "api_key": other}))
        assert receive(ws) == {"type": "ready", "tenant": "events-ws-other"}
        ws.send(json.dumps({"type": "subscribe", "jobs": [job_id]}))
        assert receive(ws) == {"type": "error", "detail": f"job {job_id} not found"}
        assert receive(ws) == {"type": "subscribed", "jobs": [], "documents": False}


@pytest.mark.parametrize(
    ("headers", "first", "code"),
    [
        ({}, {"type": "subscribe", "documents": True}, 4401),  # no key at all
        ({}, {"type": "auth", "api_key": "rk_0000000000_notakey"}, 4401),
        ({"X-API-Key": "rk_0000000000_notakey"}, {"type": "subscribe"}, 4401),
        (None, {"type": "subscribe"}, 4403),  # a key without the read scope
    ],
)
def test_websocket_refuses_without_a_valid_key(
    stack: Server, headers: dict[str, str] | None, first: dict[str, Any], code: int
) -> None:
    if headers is None:
        headers = {"X-API-Key": create_key(stack, "default", "write", name="writer")}
    # A key in the header is refused at once: the close may come before the send does.
    with (
        connect(ws_url(stack), additional_headers=headers) as ws,
        pytest.raises(ConnectionClosed) as closed,
    ):
        ws.send(json.dumps(first))
        receive(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == code


@pytest.mark.parametrize(
    "message", [b"\x00binary", "not json", json.dumps({"type": "subscribe", "jobs": "job_1"})]
)
def test_websocket_closes_on_a_message_it_does_not_have_with_1008(
    stack: Server, message: bytes | str
) -> None:
    with connect(ws_url(stack), additional_headers={"X-API-Key": stack.api_key}) as ws:
        assert receive(ws)["type"] == "ready"
        ws.send(message)
        with pytest.raises(ConnectionClosed) as closed:
            receive(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def test_websocket_never_reads_the_key_from_the_url(stack: Server) -> None:
    with connect(f"{ws_url(stack)}?api_key={stack.api_key}&X-API-Key={stack.api_key}") as ws:
        ws.send(json.dumps({"type": "subscribe", "documents": True}))
        with pytest.raises(ConnectionClosed) as closed:
            receive(ws)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


class StalledClient:
    """A WebSocket client that reads only when told to: websockets' own protocol (sans I/O) on
    a plain socket with a small receive window and segment size, so that the network holds
    only a few kilobytes of what the server sends it."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.protocol = ClientProtocol(parse_uri(url))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
        self.sock.settimeout(120)
        self.sock.connect(("127.0.0.1", int(url.split(":")[2].split("/")[0])))
        request = self.protocol.connect()
        request.headers.update(headers)
        self.protocol.send_request(request)
        self.flush()
        self.pending: list[dict[str, Any]] = []

    def flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def send(self, message: dict[str, Any]) -> None:
        self.protocol.send_text(json.dumps(message).encode())
        self.flush()

    def receive(self) -> dict[str, Any] | None:
        """The next text message; None once the connection is closed."""
        while not self.pending:
            data = self.sock.recv(65536)
            if data:
                self.protocol.receive_data(data)
            else:
                self.protocol.receive_eof()
            for event in self.protocol.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    self.pending.append(json.loads(event.data))
            self.flush()  # pongs, and the reply to a close
            if not data or self.protocol.state is State.CLOSED:
                return self.pending.pop(0) if self.pending else None
        return self.pending.pop(0)


def test_websocket_closes_a_reader_that_does_not_keep_up_with_4008(
    stack: Server, http: httpx.Client
) -> None:
    document_id = submit_and_wait(http, f"A document to patch: {uuid.uuid4().hex}.")
    client = StalledClient(ws_url(stack), {"X-API-Key": stack.api_key})
    assert client.receive() == {"type": "ready", "tenant": "default"}
    client.send({"type": "subscribe", "documents": True})
    assert client.receive() == {"type": "subscribed", "jobs": [], "documents": True}
    # Each event about 16 kB, none read meanwhile: 4.8 MB in all, more than the server's
    # socket may buffer (net.ipv4.tcp_wmem's largest, 4 MB by default) however the kernel
    # sizes it. With 40 events, 480 kB, a loaded CI run once kept the connection open (not
    # explained; this volume leaves the buffers out of it).
    patches = 300
    for number in range(patches):
        metadata = {f"field{key}": f"{number:04d}" + "x" * 496 for key in range(32)}
        changed = http.patch(
            f"{API}/documents/{document_id}", json={"metadata": metadata}, headers=MERGE_PATCH
        )
        assert changed.status_code == 200, changed.text
    numbers: list[int] = []
    # Bounded, so that a server that never closes fails the test instead of holding it (its
    # heartbeats would keep the socket from timing out).
    deadline = time.monotonic() + 60
    while (
        len(numbers) < patches
        and time.monotonic() < deadline
        and (message := client.receive()) is not None
    ):
        if message["type"] == "event":
            numbers.append(int(message["event"]["data"]["metadata"]["field0"][:4]))
    assert client.protocol.close_rcvd is not None
    assert client.protocol.close_rcvd.code == 4008
    # What did arrive came in order, and not all of it did.
    assert numbers == list(range(len(numbers))) and 0 < len(numbers) < patches


def submit_and_wait(http: httpx.Client, text: str) -> str:
    response = http.post(f"{API}/ingest", params={"wait": "true"}, json={"text": text})
    assert response.status_code == 200, response.text
    return str(response.json()["documents"][0]["id"])


def watch(server: Server, job_id: str) -> subprocess.Popen[str]:
    """`ragapi jobs watch` on the server's data directory, in a process of its own."""
    env = {
        **os.environ,
        "RAGAPI_DATA_DIR": str(server.data_dir),
        "RAGAPI_EVENTS_POLL_SECONDS": "0.1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "impl.cli", "jobs", "watch", job_id],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_jobs_watch_prints_the_events_and_exits_0_when_the_job_succeeds(
    stack: Server, http: httpx.Client
) -> None:
    job_id = submit(http, long_text(uuid.uuid4().hex, sentences=200))
    watcher = watch(stack, job_id)
    out, err = watcher.communicate(timeout=300)
    assert watcher.returncode == 0, err
    lines = out.splitlines()
    assert "job.queued" in lines[0] and "job.running" in lines[1]
    assert "job.progress" in lines[2]
    assert "document.ready" in lines[-2] and lines[-1].endswith("job.finished     succeeded")


def test_jobs_watch_follows_a_waiting_job_and_exits_3_when_it_is_cancelled(idle: Server) -> None:
    with idle.client() as client:
        job_id = submit(client, f"Cancelled while it waits: {uuid.uuid4().hex}.")
        watcher = watch(idle, job_id)
        assert watcher.stdout is not None
        assert "job.queued" in watcher.stdout.readline()  # printed while the job waits
        assert client.post(f"{API}/jobs/{job_id}/cancel").status_code == 200
        out, err = watcher.communicate(timeout=120)
    assert watcher.returncode == 3, err
    lines = out.splitlines()
    assert "document.failed" in lines[0] and "ingestion was cancelled" in lines[0]
    assert lines[-1].endswith("job.finished     cancelled")
