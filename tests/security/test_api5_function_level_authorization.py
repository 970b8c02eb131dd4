"""API5:2023 Broken Function Level Authorization: a key can do what its scopes allow and
nothing more."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server, create_key

API = "/api/v1"
WRITES = [("POST", "/ingest", {"text": "x"}), ("DELETE", "/documents/doc_x", None)]
ADMIN = [
    ("GET", "/keys", None),
    ("POST", "/keys", {"name": "k", "scopes": ["read"]}),
    ("DELETE", "/keys/key_x", None),
    ("GET", "/metrics", None),
]
READS = [
    ("GET", "/documents", None),
    ("POST", "/search", {"query": "x"}),
    ("POST", "/query", {"question": "x"}),
    ("GET", "/jobs/job_x", None),
]


def call(http: httpx.Client, method: str, path: str, body: object) -> httpx.Response:
    return http.request(method, f"{API}{path}", json=body)


@pytest.mark.parametrize(
    ("scopes", "allowed"), [("read", READS), ("write", WRITES), ("read,write", READS + WRITES)]
)
def test_scopes_bound_what_a_key_can_do(server: Server, scopes: str, allowed: list) -> None:  # type: ignore[type-arg]
    with server.client(create_key(server, "default", scopes)) as http:
        for method, path, body in READS + WRITES + ADMIN:
            response = call(http, method, path, body)
            if (method, path, body) in allowed:
                assert response.status_code not in (401, 403), (scopes, path, response.text)
            else:
                assert response.status_code == 403, (scopes, path, response.text)
                assert response.json()["type"] == "urn:ragapi:problem:forbidden"


def test_a_read_key_cannot_ingest(server: Server) -> None:
    with server.client(create_key(server, "default", "read")) as http:
        response = http.post(f"{API}/ingest", json={"text": "should not be stored"})
    assert response.status_code == 403
    assert "write scope" in response.json()["detail"]
