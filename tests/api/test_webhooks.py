"""Webhooks against a real server (embedded Chroma, the packaged embedding model) delivering to a
real receiver on loopback: signatures checked here with hmac by the documented algorithm,
independently of the server's code; retries; the SSRF guard with private addresses refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from impl.api.app import render_event
from impl.db import open_database, utcnow
from impl.rag.events import EventRow
from impl.rag.webhooks import Webhooks
from impl.settings import Settings
from tests.conftest import ROOT, UNLIMITED, Server, create_key, start_server

API = "/api/v1"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server that records every POST and answers with ``statuses`` in turn (then
    200)."""

    url: str
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0  # seconds before each answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"{count} deliveries expected, {len(self.received)} came")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            time.sleep(state.delay)
            with state.lock:
                state.received.append(
                    Received({k.lower(): v for k, v in self.headers.items()}, body)
                )
                status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Receiver(f"http://127.0.0.1:{httpd.server_address[1]}/hook")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("webhooks") / "data",
        webhooks_allow_private="true",
        webhooks_poll_seconds="0.1",
        webhooks_retry_base_seconds="0.2",
        webhooks_max_attempts="3",
        **UNLIMITED,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(stack: Server) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


def verify(secret: str, delivery: Received) -> dict[str, Any]:
    """The Standard Webhooks check a receiver makes, written from the README alone."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    message_id = delivery.headers["webhook-id"]
    timestamp = delivery.headers["webhook-timestamp"]
    signed = f"{message_id}.{timestamp}.".encode() + delivery.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = [s.partition(",") for s in delivery.headers["webhook-signature"].split()]
    assert any(v == "v1" and hmac.compare_digest(sig, expected) for v, _, sig in versions)
    assert abs(time.time() - int(timestamp)) < 300
    payload: dict[str, Any] = json.loads(delivery.body)
    return payload


def readme_verify() -> Any:
    """The README's verification example, run as a receiver would copy it."""
    section = (ROOT / "README.md").read_text().split("## Webhooks")[1]
    code = section.split("```python\n")[1].split("```")[0]
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102  (the project's own README)
    return scope["verify"]


def ingest(http: httpx.Client) -> None:
    text = f"Webhook test document {uuid.uuid4().hex}: the lighthouse keeper logs the tides."
    response = http.post(f"{API}/ingest", params={"wait": "true"}, json={"text": text})
    assert response.json()["job"]["status"] == "succeeded", response.text


def register(http: httpx.Client, url: str, **fields: Any) -> dict[str, Any]:
    response = http.post(f"{API}/webhooks", json={"url": url, **fields})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    assert response.headers["location"] == f"{API}/webhooks/{created['id']}"
    return created


def test_an_ingest_is_delivered_signed_and_its_status_recorded(
    http: httpx.Client, receiver: Receiver
) -> None:
    created = register(http, receiver.url, description="sync")
    assert created["secret"].startswith("whsec_")
    assert len(base64.b64decode(created["secret"].removeprefix("whsec_"))) >= 24
    assert created["last_delivery"] is None and created["event_types"] is None
    ingest(http)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        deliveries = receiver.wait_for(1)
        if json.loads(deliveries[-1].body)["type"] == "job.finished":
            break
        time.sleep(0.1)
    payloads = [verify(created["secret"], d) for d in deliveries]
    types = [p["type"] for p in payloads]
    assert types[0] == "job.queued" and "document.ready" in types and "job.finished" in types
    ids = [int(d.headers["webhook-id"]) for d in deliveries]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # in order, each once
    ready = payloads[types.index("document.ready")]
    assert ready["document_id"].startswith("doc_") and ready["data"]["version"] == 1
    # A body changed in transit no longer verifies.
    forged = Received(deliveries[0].headers, deliveries[0].body.replace(b"job", b"jab", 1))
    with pytest.raises(AssertionError):
        verify(created["secret"], forged)
    documented = readme_verify()
    assert all(documented(created["secret"], d.headers, d.body) for d in deliveries)
    assert not documented(created["secret"], forged.headers, forged.body)
    shown = http.get(f"{API}/webhooks/{created['id']}").json()
    assert "secret" not in shown
    last = shown["last_delivery"]
    assert last["delivered"] is True and last["status_code"] == 200 and last["attempts"] == 1
    assert last["event_id"] == ids[-1]
    http.delete(f"{API}/webhooks/{created['id']}")


def test_a_failed_delivery_is_retried_and_the_last_status_recorded(
    http: httpx.Client, receiver: Receiver
) -> None:
    receiver.statuses = [500]
    created = register(http, receiver.url, event_types=["document.ready"])
    ingest(http)
    first, second = receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]  # the idempotency key
    assert verify(created["secret"], second)["type"] == "document.ready"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        last = http.get(f"{API}/webhooks/{created['id']}").json()["last_delivery"]
        if last and last["delivered"]:
            break
        time.sleep(0.1)
    assert last["attempts"] == 2 and last["status_code"] == 200 and last["error"] is None
    assert len(receiver.received) == 2  # only document.ready, which came through
    http.delete(f"{API}/webhooks/{created['id']}")


def test_given_up_after_the_last_attempt(http: httpx.Client, receiver: Receiver) -> None:
    receiver.statuses = [503, 503, 503]
    created = register(http, receiver.url, event_types=["document.ready"])
    ingest(http)
    receiver.wait_for(3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        last = http.get(f"{API}/webhooks/{created['id']}").json()["last_delivery"]
        if last and last["attempts"] == 3:
            break
        time.sleep(0.1)
    assert last["delivered"] is False and last["status_code"] == 503
    time.sleep(1)  # the retry schedule is over: nothing more comes
    assert len(receiver.received) == 3
    http.delete(f"{API}/webhooks/{created['id']}")


def test_webhooks_belong_to_their_tenant_and_need_the_admin_scope(
    stack: Server, http: httpx.Client, receiver: Receiver
) -> None:
    created = register(http, receiver.url)
    other_admin = create_key(stack, "other-tenant", "admin")
    with stack.client(other_admin) as other:
        assert other.get(f"{API}/webhooks/{created['id']}").status_code == 404
        assert other.delete(f"{API}/webhooks/{created['id']}").status_code == 404
        assert other.get(f"{API}/webhooks").json()["items"] == []
    writer = create_key(stack, "default", "read,write")
    with stack.client(writer) as client:
        refused = client.post(f"{API}/webhooks", json={"url": receiver.url})
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
        assert client.get(f"{API}/webhooks").status_code == 403
    second = register(http, receiver.url)
    page = http.get(f"{API}/webhooks", params={"limit": 1}).json()
    assert [w["id"] for w in page["items"]] == [second["id"]] and page["next_cursor"]
    rest = http.get(f"{API}/webhooks", params={"limit": 1, "cursor": page["next_cursor"]}).json()
    assert [w["id"] for w in rest["items"]] == [created["id"]]
    for hook in (created, second):
        assert http.delete(f"{API}/webhooks/{hook['id']}").status_code == 204
        assert http.get(f"{API}/webhooks/{hook['id']}").status_code == 404


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the default setting: private addresses refused."""
    running = start_server(
        tmp_path_factory.mktemp("guarded") / "data", webhooks_poll_seconds="0.1", **UNLIMITED
    )
    yield running
    running.stop()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/hook",
        "http://localhost:{port}/hook",
        "http://[::1]:{port}/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://0.0.0.0:{port}/",
        "http://[::ffff:127.0.0.1]:{port}/",
    ],
)
def test_private_addresses_are_refused_at_registration(
    guarded: Server, receiver: Receiver, url: str
) -> None:
    port = receiver.url.split(":")[2].split("/")[0]
    with guarded.client() as http:
        response = http.post(f"{API}/webhooks", json={"url": url.format(port=port)})
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "non-public" in response.json()["detail"]
        assert http.get(f"{API}/webhooks").json()["items"] == []
    assert receiver.received == []


def test_only_http_and_https_are_taken(guarded: Server) -> None:
    with guarded.client() as http:
        for url in ("ftp://example.com/hook", "file:///etc/passwd"):
            response = http.post(f"{API}/webhooks", json={"url": url})
            assert response.status_code == 400, response.text


def test_a_delivery_to_a_private_address_is_refused_and_nothing_sent(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The check at delivery time (a name that resolved elsewhere at registration now points
    at loopback): nothing reaches the receiver, and the error says why."""
    webhooks = Webhooks(Settings(data_dir=tmp_path / "data"), render_event)
    try:
        event = EventRow(
            id=7,
            tenant="t",
            job_id=None,
            document_id="doc_1",
            type="document.ready",
            data={},
            created_at=utcnow(),
        )
        outcome = webhooks.send(receiver.url.replace("127.0.0.1", "localhost"), "whsec_AAAA", event)
        assert outcome.status_code is None and "refused" in (outcome.error or "")
        assert receiver.received == []
    finally:
        webhooks.close()


def test_two_processes_delivering_at_once_send_each_event_once(
    tmp_path: Path, registry_url: str, receiver: Receiver
) -> None:
    """Two delivery loops on one registry (as two server processes have), each running at the
    same time: the lease gives each webhook to one of them, so every event arrives once, in
    order."""
    settings = Settings(
        data_dir=tmp_path / "data",
        registry_url=registry_url,
        registry_auto_upgrade=True,
        webhooks_allow_private=True,
    )
    first, second = Webhooks(settings, render_event), Webhooks(settings, render_event)
    receiver.delay = 0.02  # slow enough that the two loops overlap
    try:
        created = first.create("t", receiver.url, None, None)
        database = open_database(settings.resolved_registry_url)
        try:
            with database.write() as session:
                for n in range(20):
                    session.add(
                        EventRow(
                            tenant="t",
                            job_id=None,
                            document_id=f"doc_{n}",
                            type="document.deleted",
                            data={},
                            created_at=utcnow(),
                        )
                    )
        finally:
            database.close()
        deadline = time.monotonic() + 60
        while len(receiver.received) < 20 and time.monotonic() < deadline:
            loops = [threading.Thread(target=w.deliver_due) for w in (first, second)]
            for loop in loops:
                loop.start()
            for loop in loops:
                loop.join()
        ids = [int(d.headers["webhook-id"]) for d in receiver.received]
        assert len(ids) == 20 and ids == sorted(set(ids))
        assert all(
            verify(created.secret, d)["type"] == "document.deleted" for d in receiver.received
        )
    finally:
        first.close()
        second.close()
