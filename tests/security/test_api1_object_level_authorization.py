"""API1:2023 Broken Object Level Authorization: every operation that takes an id answers
another tenant's id exactly as an id that does not exist, and nothing of one tenant appears in
another's lists, searches or answers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, create_key
from tests.documents import CORPUS, make_text

API = "/api/v1"


@pytest.fixture(scope="module")
def tenants(server: Server) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    with (
        server.client(create_key(server, "acme", "read,write,admin")) as acme,
        server.client(create_key(server, "globex", "read,write,admin")) as globex,
    ):
        yield acme, globex


@pytest.fixture(scope="module")
def acme_objects(tenants: tuple[httpx.Client, httpx.Client]) -> dict[str, str]:
    acme, _ = tenants
    saturn = CORPUS["saturn"]
    body = acme.post(
        f"{API}/ingest",
        params={"wait": "true"},
        files=[("files", ("saturn.txt", make_text(saturn.paragraphs), "text/plain"))],
    ).json()
    key = acme.post(f"{API}/keys", json={"name": "acme reader", "scopes": ["read"]}).json()
    # A public name (no delivery reaches it here: the tests run offline).
    webhook = acme.post(f"{API}/webhooks", json={"url": "https://hooks.example.com/acme"}).json()
    return {
        "job": body["job"]["id"],
        "document": body["documents"][0]["id"],
        "key": key["id"],
        "webhook": webhook["id"],
    }


def same_as_missing(response: httpx.Response, kind: str, object_id: str) -> None:
    assert response.status_code == 404, response.text
    assert response.json()["detail"] == f"{kind} {object_id} not found"


def test_every_id_of_another_tenant_is_not_found(
    tenants: tuple[httpx.Client, httpx.Client], acme_objects: dict[str, str]
) -> None:
    acme, globex = tenants
    job, document, key = acme_objects["job"], acme_objects["document"], acme_objects["key"]
    same_as_missing(globex.get(f"{API}/jobs/{job}"), "job", job)
    same_as_missing(globex.get(f"{API}/documents/{document}"), "document", document)
    same_as_missing(globex.get(f"{API}/documents/{document}/chunks"), "document", document)
    same_as_missing(globex.delete(f"{API}/documents/{document}"), "document", document)
    same_as_missing(globex.delete(f"{API}/keys/{key}"), "key", key)
    webhook = acme_objects["webhook"]
    same_as_missing(globex.get(f"{API}/webhooks/{webhook}"), "webhook", webhook)
    same_as_missing(globex.delete(f"{API}/webhooks/{webhook}"), "webhook", webhook)
    # ...and the owner still has all of it.
    assert acme.get(f"{API}/documents/{document}").json()["status"] == "ready"
    assert acme.get(f"{API}/jobs/{job}").status_code == 200
    assert key in {k["id"] for k in acme.get(f"{API}/keys").json()["items"]}
    assert acme.get(f"{API}/webhooks/{webhook}").status_code == 200


def test_nothing_of_another_tenant_is_listed_searched_or_cited(
    tenants: tuple[httpx.Client, httpx.Client], acme_objects: dict[str, str]
) -> None:
    _, globex = tenants
    document = acme_objects["document"]
    question = CORPUS["saturn"].question
    listed = globex.get(f"{API}/documents", params={"limit": 100}).json()["items"]
    assert document not in {d["id"] for d in listed}
    hits = globex.post(f"{API}/search", json={"query": question, "top_k": 50}).json()
    assert document not in {r["document_id"] for r in hits["results"]}
    by_id = globex.post(
        f"{API}/search", json={"query": question, "filters": {"document_ids": [document]}}
    ).json()
    assert by_id["results"] == []
    answer = globex.post(f"{API}/query", json={"question": question}).json()
    assert document not in {c["document_id"] for c in answer["citations"]}
    keys = globex.get(f"{API}/keys").json()["items"]
    assert {k["tenant"] for k in keys} == {"globex"}
    webhooks = globex.get(f"{API}/webhooks").json()["items"]
    assert acme_objects["webhook"] not in {w["id"] for w in webhooks}


def test_the_same_content_in_two_tenants_is_two_documents(
    tenants: tuple[httpx.Client, httpx.Client], acme_objects: dict[str, str]
) -> None:
    _, globex = tenants
    saturn = CORPUS["saturn"]
    body = globex.post(
        f"{API}/ingest",
        params={"wait": "true"},
        files=[("files", ("saturn.txt", make_text(saturn.paragraphs), "text/plain"))],
    ).json()
    assert body["job"]["duplicate_document_ids"] == []
    assert body["documents"][0]["id"] != acme_objects["document"]
