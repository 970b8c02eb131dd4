"""Every failure a client can cause is a problem+json with the right status and type, and
nothing internal leaks."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

from impl.api.app import create_app
from impl.api.handlers import HANDLERS
from impl.settings import Settings

PROBLEM = "application/problem+json"


def assert_problem(response: httpx.Response, status: int, kind: str) -> dict:  # type: ignore[type-arg]
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["type"] == f"urn:ragapi:problem:{kind}"
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert body["instance"] == f"urn:request:{response.headers['x-request-id']}"
    return body


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/api/v1/search", content=b'{"query": "x"', headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in assert_problem(response, 400, "malformed-json")["detail"]


def test_invalid_utf8_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/api/v1/search",
        content=b'{"query": "caf\xe9"}',
        headers={"content-type": "application/json"},
    )
    assert "UTF-8" in assert_problem(response, 400, "invalid-utf8")["detail"]


def test_validation_failures_list_every_field(client: httpx.Client) -> None:
    response = client.post(
        "/api/v1/search", json={"query": "x", "top_k": "2", "min_score": None, "colour": "red"}
    )
    body = assert_problem(response, 400, "validation-failed")
    locations = {e["location"] for e in body["errors"]}
    assert locations == {"body/top_k", "body/min_score", "body/colour"}


def test_strict_types_follow_the_schema(client: httpx.Client) -> None:
    for bad in (
        {"query": "x", "top_k": 2.5},
        {"query": "x", "top_k": True},
        {"query": 7},
        {"query": "x", "top_k": 51},
        {"query": "   "},
        {},
    ):
        assert_problem(client.post("/api/v1/search", json=bad), 400, "validation-failed")
    listing = client.get("/api/v1/documents", params={"created_after": "0"})
    assert assert_problem(listing, 400, "validation-failed")["errors"][0]["location"] == (
        "query/created_after"
    )
    assert_problem(client.get("/api/v1/documents?limit=2&limit=3"), 400, "validation-failed")
    assert_problem(client.get("/api/v1/documents?limit=0"), 400, "validation-failed")
    assert client.get("/api/v1/documents?limit=2").status_code == 200


def test_bad_path_parameter_is_400(client: httpx.Client) -> None:
    body = assert_problem(client.get("/api/v1/documents/bad%20id"), 400, "validation-failed")
    assert body["errors"][0]["location"] == "path/doc_id"


def test_unknown_path_is_404(client: httpx.Client) -> None:
    assert_problem(client.get("/api/v1/nothing-here"), 404, "not-found")
    assert_problem(client.get("/api/v1/health/"), 404, "not-found")


def test_wrong_method_is_405_with_allow(client: httpx.Client) -> None:
    response = client.post("/api/v1/documents/doc_1")
    assert_problem(response, 405, "method-not-allowed")
    assert set(response.headers["allow"].split(", ")) == {"DELETE", "GET", "PATCH", "PUT"}


def test_wrong_content_type_is_415(client: httpx.Client) -> None:
    response = client.post(
        "/api/v1/search", content=b"query", headers={"content-type": "text/plain"}
    )
    assert "application/json" in assert_problem(response, 415, "unsupported-media-type")["detail"]


def test_body_over_the_limit_is_413(client: httpx.Client) -> None:
    big = b'{"query": "' + b"a" * (3 * 1024 * 1024) + b'"}'
    assert_problem(
        client.post("/api/v1/search", content=big, headers={"content-type": "application/json"}),
        413,
        "payload-too-large",
    )


def test_request_id_is_echoed_and_in_the_problem(client: httpx.Client) -> None:
    response = client.get("/api/v1/nothing", headers={"x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    assert response.json()["instance"] == "urn:request:trace-42"
    generated = client.get("/api/v1/health").headers["x-request-id"]
    assert len(generated) == 32
    hostile = client.get("/api/v1/health", headers={"x-request-id": "a\tb<script>"})
    assert hostile.headers["x-request-id"] != "a\tb<script>"


def test_unexpected_errors_are_500_without_internals(tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def broken() -> None:
        raise RuntimeError("secret internals at /srv/ragapi/db.sqlite")

    app = create_app(Settings(data_dir=tmp_path), {**HANDLERS, "getHealth": broken})
    with TestClient(app) as http:
        response = http.get("/api/v1/health")
    body = assert_problem(response, 500, "internal-error")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert "/srv" not in body["detail"]
