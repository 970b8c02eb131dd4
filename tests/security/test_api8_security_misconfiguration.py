"""API8:2023 Security Misconfiguration: CORS closed unless configured, preflight answered for
allowed origins only, security headers on every answer, auth off only with a loud warning,
and one JSON log line per request that never holds the key."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, start_server

API = "/api/v1"
ORIGIN = "https://app.example.com"


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        f"{url}{API}/search",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "x-api-key, content-type",
        },
    )


def test_cors_is_closed_by_default(server: Server) -> None:
    response = preflight(server.url, ORIGIN)
    assert "access-control-allow-origin" not in response.headers
    with server.client() as http:
        simple = http.get(f"{API}/documents", headers={"origin": ORIGIN})
    assert "access-control-allow-origin" not in simple.headers


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("open") / "data",
        cors_allow_origins=json.dumps([ORIGIN]),
        auth_enabled="false",
        log_level="info",
    )
    yield running
    running.stop()


def test_preflight_is_answered_for_allowed_origins_only(open_server: Server) -> None:
    allowed = preflight(open_server.url, ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
    refused = preflight(open_server.url, "https://evil.example.net")
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


def test_auth_off_works_without_keys_and_warns_loudly(open_server: Server) -> None:
    assert "AUTHENTICATION IS OFF" in open_server.log.read_text()
    assert httpx.get(f"{open_server.url}{API}/documents").status_code == 200


def test_security_headers_on_every_answer(server: Server) -> None:
    with server.client() as http:
        for response in (http.get(f"{API}/health"), http.get(f"{API}/nothing"), http.get("/docs")):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert "server" not in response.headers


def test_one_json_log_line_per_request_without_the_key(server: Server) -> None:
    with server.client() as http:
        http.get(f"{API}/documents", headers={"x-request-id": "log-probe-1"})
    # The line is written once the answer is sent (its latency is the whole request's), so
    # the client may read the log before it is there.
    deadline = time.monotonic() + 10
    while True:
        log = server.log.read_text()
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        probes = [entry for entry in lines if entry.get("request_id") == "log-probe-1"]
        if probes or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    [line] = probes
    assert line["operation"] == "listDocuments"
    assert line["status"] == 200
    assert line["tenant"] == "default"
    assert line["key_id"].startswith("key_")
    assert line["latency_ms"] >= 0
    # The key itself is only in the one line that showed it on the first start.
    assert log.count(server.api_key) == 1
