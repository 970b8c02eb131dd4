"""API2:2023 Broken Authentication: missing, malformed, wrong and revoked keys are 401, the
same way, and revocation takes effect on the next request."""

from __future__ import annotations

import httpx

from tests.conftest import Server, create_key

API = "/api/v1"


def assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:ragapi:problem:unauthenticated"
    assert "X-API-Key" in response.headers["www-authenticate"]


def test_every_secured_operation_needs_a_key(server: Server) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        for method, path in [
            ("GET", "/documents"),
            ("GET", "/documents/doc_x"),
            ("DELETE", "/documents/doc_x"),
            ("GET", "/documents/doc_x/chunks"),
            ("GET", "/jobs/job_x"),
            ("POST", "/search"),
            ("POST", "/query"),
            ("POST", "/ingest"),
            ("GET", "/keys"),
            ("POST", "/keys"),
            ("DELETE", "/keys/key_x"),
            ("GET", "/metrics"),
        ]:
            assert_unauthenticated(anonymous.request(method, f"{API}{path}"))
        # The probes stay open, for load balancers.
        assert anonymous.get(f"{API}/health").status_code == 200
        assert anonymous.get(f"{API}/health/ready").status_code == 200


def test_malformed_and_wrong_keys_are_refused(server: Server) -> None:
    real = server.api_key
    for presented in (
        "",
        "nonsense",
        "rk_",
        "rk__x",
        real[:-1] + ("a" if real[-1] != "a" else "b"),
        real.replace("rk_", "rk_0", 1),
        "Bearer " + real,
        real + "x",
    ):
        with httpx.Client(base_url=server.url, headers={"X-API-Key": presented}) as http:
            assert_unauthenticated(http.get(f"{API}/documents"))


def test_a_revoked_key_stops_working_at_once(server: Server) -> None:
    key = create_key(server, "default", "read")
    with server.client(key) as http:
        assert http.get(f"{API}/documents").status_code == 200
        key_id = next(
            k["id"]
            for k in server.client().get(f"{API}/keys").json()["items"]
            if key.startswith(k["prefix"] + "_")
        )
        with server.client() as admin:
            assert admin.delete(f"{API}/keys/{key_id}").status_code == 204
        assert_unauthenticated(http.get(f"{API}/documents"))
        listed = {k["id"]: k for k in server.client().get(f"{API}/keys").json()["items"]}
        assert listed[key_id]["revoked_at"] is not None


def test_the_first_start_printed_one_working_admin_key(server: Server) -> None:
    log = server.log.read_text()
    assert log.count("X-API-Key: rk_") == 1
    with server.client() as admin:
        assert admin.get(f"{API}/metrics").status_code == 200
