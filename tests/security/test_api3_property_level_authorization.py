"""API3:2023 Broken Object Property Level Authorization: responses hold no secrets, hashes or
internal fields, and requests cannot set fields the contract does not have."""

from __future__ import annotations

import re

from tests.conftest import Server

API = "/api/v1"


def test_a_key_secret_is_shown_once_and_never_its_hash(server: Server) -> None:
    with server.client() as admin:
        created = admin.post(f"{API}/keys", json={"name": "shown once", "scopes": ["read"]})
        assert created.status_code == 201
        secret = created.json()["key"]
        assert created.headers["location"] == f"{API}/keys/{created.json()['id']}"
        listing = admin.get(f"{API}/keys")
    assert secret not in listing.text
    assert set(listing.json()["items"][0]) == {
        "id",
        "name",
        "prefix",
        "tenant",
        "scopes",
        "rate_limits",
        "created_at",
        "revoked_at",
    }
    # A 64-hex string in a key listing could only be the stored hash.
    assert not re.search(r"\b[0-9a-f]{64}\b", listing.text)


def test_unknown_fields_are_refused_everywhere(server: Server) -> None:
    with server.client() as admin:
        for path, body in [
            ("/search", {"query": "x", "tenant": "globex"}),
            ("/query", {"question": "x", "provider": "openai"}),
            ("/ingest", {"text": "hello", "status": "ready"}),
            ("/keys", {"name": "k", "scopes": ["read"], "tenant": "globex"}),
        ]:
            response = admin.post(f"{API}{path}", json=body)
            assert response.status_code == 400, (path, response.text)
            [error] = response.json()["errors"]
            assert error["message"] == "Extra inputs are not permitted"


def test_errors_hold_no_internals(server: Server) -> None:
    with server.client() as admin:
        responses = [
            admin.get(f"{API}/documents/doc_nothere"),
            admin.post(f"{API}/search", content=b"{", headers={"content-type": "application/json"}),
            admin.get(f"{API}/documents", params={"cursor": "bm9wZQ"}),
        ]
    for response in responses:
        text = response.text
        assert "Traceback" not in text and "/work/" not in text and "sqlalchemy" not in text
        assert "server" not in response.headers  # no server software or version
