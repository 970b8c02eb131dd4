"""The product through HTTP, as a user drives it: every file type in, the right document
answers the right question, duplicates, jobs, pagination, chunks, and delete proven against
Chroma itself (a real `chroma run` server, read by our own client)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import chromadb
import httpx
import pytest

from impl.rag.store import collection_name
from tests.conftest import UNLIMITED, Server, start_server
from tests.documents import (
    CORPUS,
    make_docx,
    make_html,
    make_markdown,
    make_pdf,
    make_png,
    make_text,
)

API = "/api/v1"
MODES = ["dense", "lexical", "hybrid"]
# One corpus document per supported type, uploaded under a misleading name where it helps
# show that content, not the name, decides the type.
UPLOADS = {
    "rust": ("rust-notes.pdf", "application/pdf", lambda d: make_pdf(d.paragraphs)),
    "sourdough": (
        "sourdough.docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        lambda d: make_docx(d.paragraphs),
    ),
    "saturn": ("saturn.html", "text/html", lambda d: make_html(d.title, d.paragraphs)),
    "french_revolution": (
        "revolution.md",
        "text/markdown",
        lambda d: make_markdown(d.title, d.paragraphs),
    ),
    "photosynthesis": ("photosynthesis.bin", "text/plain", lambda d: make_text(d.paragraphs)),
}


@cache
def upload_bytes(key: str) -> bytes:
    """Built once: a PDF made twice differs (fpdf2 stamps it), and duplicates need the same."""
    return UPLOADS[key][2](CORPUS[key])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, chroma_url: str) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("workflow") / "data", chroma_url=chroma_url, **UNLIMITED
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(stack: Server) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


@pytest.fixture(scope="module")
def ingested(http: httpx.Client) -> dict[str, dict[str, Any]]:
    """The five documents, one per type, ingested in one request and waited for."""
    files = [
        ("files", (name, upload_bytes(key), "application/octet-stream"))
        for key, (name, _media_type, _build) in UPLOADS.items()
    ]
    response = http.post(
        f"{API}/ingest",
        params={"wait": "true"},
        files=files,
        data={"metadata": '{"team": "science", "year": 2026}'},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job"]["status"] == "succeeded"
    assert body["job"]["chunks_done"] == body["job"]["chunks_total"] > 0
    return dict(zip(UPLOADS, body["documents"], strict=True))


def chroma_ids(chroma_url: str, document_id: str) -> list[str]:
    host, port = chroma_url.removeprefix("http://").split(":")
    client = chromadb.HttpClient(host=host, port=int(port))
    collection = client.get_collection(collection_name("default"))
    return list(collection.get(where={"document_id": document_id})["ids"])


def test_every_type_is_recognised_by_content(ingested: dict[str, dict[str, Any]]) -> None:
    for key, (filename, media_type, _build) in UPLOADS.items():
        document = ingested[key]
        assert document["media_type"] == media_type, key
        assert document["filename"] == filename
        assert document["status"] == "ready"
        assert document["chunk_count"] >= 1
        assert document["metadata"] == {"team": "science", "year": 2026}


def test_the_right_document_answers_each_question(
    http: httpx.Client, ingested: dict[str, dict[str, Any]]
) -> None:
    for key, document in ingested.items():
        answer = http.post(f"{API}/query", json={"question": CORPUS[key].question}).json()
        assert answer["found"] is True, key
        assert answer["provider"] == "extractive"
        assert answer["citations"], key
        assert answer["citations"][0]["document_id"] == document["id"], (key, answer)
        for citation in answer["citations"]:
            assert f"[{citation['marker']}]" in answer["answer"]
        chunks = http.get(f"{API}/documents/{document['id']}/chunks").json()["items"]
        quote = answer["citations"][0]["quote"]
        assert any(quote in chunk["text"] for chunk in chunks)


@pytest.mark.parametrize("mode", MODES)
def test_search_ranks_the_right_document_first(
    http: httpx.Client, ingested: dict[str, dict[str, Any]], mode: str
) -> None:
    for key, document in ingested.items():
        body = {"query": CORPUS[key].question, "top_k": 3, "retrieval": {"mode": mode}}
        results = http.post(f"{API}/search", json=body).json()["results"]
        assert results[0]["document_id"] == document["id"], key
        assert results == sorted(results, key=lambda r: -r["score"])
        # Each hit says which signals found it, with their own scores and ranks.
        for result in results:
            signals = result["explain"]
            assert signals and set(signals) <= {"dense", "lexical"}
            if mode != "hybrid":
                assert set(signals) == {mode}
                assert signals[mode]["score"] == result["score"]


def test_hybrid_is_the_default_and_weights_change_the_order(
    http: httpx.Client, ingested: dict[str, dict[str, Any]]
) -> None:
    query = {"query": CORPUS["saturn"].question, "top_k": 10}
    default = http.post(f"{API}/search", json=query).json()["results"]
    hybrid = http.post(f"{API}/search", json={**query, "retrieval": {"mode": "hybrid"}}).json()
    assert default == hybrid["results"]
    assert any(set(r["explain"]) == {"dense", "lexical"} for r in default)
    dense = http.post(f"{API}/search", json={**query, "retrieval": {"mode": "dense"}}).json()
    dense_only = {"mode": "hybrid", "weights": {"dense": 1, "lexical": 0}}
    weighted = http.post(f"{API}/search", json={**query, "retrieval": dense_only}).json()
    dense_ids = [r["chunk_id"] for r in dense["results"]]
    assert [r["chunk_id"] for r in weighted["results"]][: len(dense_ids)] == dense_ids
    refused = http.post(
        f"{API}/search", json={**query, "retrieval": {"weights": {"dense": 0, "lexical": 0}}}
    )
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("mode", MODES)
def test_metadata_filters_narrow_the_search(
    http: httpx.Client, ingested: dict[str, dict[str, Any]], mode: str
) -> None:
    def search(filters: dict[str, Any]) -> list[dict[str, Any]]:
        body = {"query": question, "filters": filters, "retrieval": {"mode": mode}}
        results: list[dict[str, Any]] = http.post(f"{API}/search", json=body).json()["results"]
        return results

    question = f"{CORPUS['rust'].question} Saturn"
    assert search({"metadata": {"team": "science", "year": {"gte": 2020}}})
    assert search({"metadata": {"team": {"in": ["kitchen", "legal"]}}}) == []
    only = search({"document_ids": [ingested["saturn"]["id"]]})
    assert {r["document_id"] for r in only} == {ingested["saturn"]["id"]}


def test_pdf_chunks_keep_their_pages_and_offsets(
    http: httpx.Client, ingested: dict[str, dict[str, Any]]
) -> None:
    document = ingested["rust"]
    chunks = http.get(f"{API}/documents/{document['id']}/chunks", params={"limit": 100}).json()
    assert [c["index"] for c in chunks["items"]] == list(range(document["chunk_count"]))
    assert all(c["page"] >= 1 for c in chunks["items"])
    assert all(c["end_char"] - c["start_char"] == len(c["text"]) for c in chunks["items"])
    text_chunks = http.get(f"{API}/documents/{ingested['saturn']['id']}/chunks").json()
    assert all(c["page"] is None for c in text_chunks["items"])


def test_paging_through_documents_sees_each_once_newest_first(
    http: httpx.Client, ingested: dict[str, dict[str, Any]]
) -> None:
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = http.get(f"{API}/documents", params=params).json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    ids = [d["id"] for d in seen]
    assert len(ids) == len(set(ids))
    assert {d["id"] for d in ingested.values()} <= set(ids)
    stamps = [(d["created_at"], d["id"]) for d in seen]
    assert stamps == sorted(stamps, reverse=True)
    titled = http.get(f"{API}/documents", params={"title": "SATURN"}).json()["items"]
    assert [d["id"] for d in titled] == [ingested["saturn"]["id"]]


def test_the_same_content_again_is_a_duplicate_and_embeds_nothing(
    http: httpx.Client, ingested: dict[str, dict[str, Any]], chroma_url: str
) -> None:
    original = ingested["rust"]
    before = chroma_ids(chroma_url, original["id"])
    again = http.post(
        f"{API}/ingest",
        params={"wait": "true"},
        files=[("files", ("copy.pdf", upload_bytes("rust"), "application/pdf"))],
    ).json()
    assert again["job"]["status"] == "succeeded"
    assert again["job"]["duplicate_document_ids"] == [original["id"]]
    assert again["documents"][0]["id"] == original["id"]
    assert chroma_ids(chroma_url, original["id"]) == before


def test_a_job_runs_in_the_background_and_reports_progress(http: httpx.Client) -> None:
    text = " ".join(
        f"Lighthouse keeper log entry {i}: the lamp was lit at dusk." for i in range(300)
    )
    accepted = http.post(f"{API}/ingest", json={"text": text, "title": "Lighthouse log"})
    assert accepted.status_code == 202
    job = accepted.json()["job"]
    assert accepted.headers["location"] == f"{API}/jobs/{job['id']}"
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = http.get(accepted.headers["location"]).json()
        assert 0 <= job["chunks_done"] <= max(job["chunks_total"], 0) or job["chunks_total"] == 0
    assert job["status"] == "succeeded"
    assert job["chunks_done"] == job["chunks_total"] > 1
    document = http.get(f"{API}/documents/{job['document_ids'][0]}").json()
    assert document["status"] == "ready"
    assert document["chunk_count"] == job["chunks_total"]


def test_bad_files_are_refused_and_nothing_is_stored(http: httpx.Client) -> None:
    def count() -> int:
        return len(http.get(f"{API}/documents", params={"limit": 100}).json()["items"])

    before = count()
    empty = http.post(f"{API}/ingest", files=[("files", ("empty.txt", b"", "text/plain"))])
    assert empty.status_code == 400
    assert "empty" in empty.json()["detail"]
    image = http.post(
        f"{API}/ingest",
        files=[
            ("files", ("fine.txt", make_text(["A fine text file."]), "text/plain")),
            ("files", ("photo.pdf", make_png(), "application/pdf")),
        ],
    )
    assert image.status_code == 415
    assert "photo.pdf" in image.json()["detail"]
    assert count() == before


def test_a_question_nothing_answers_says_so(http: httpx.Client, ingested: dict[str, Any]) -> None:
    answer = http.post(
        f"{API}/query",
        json={"question": "What is the capital of Atlantis?"},
    ).json()
    assert answer["found"] is False
    assert answer["citations"] == []
    assert answer["answer"]


def test_deleted_documents_are_gone_everywhere(
    http: httpx.Client, ingested: dict[str, dict[str, Any]], chroma_url: str, stack: Server
) -> None:
    document = ingested["sourdough"]
    assert chroma_ids(chroma_url, document["id"])
    assert http.delete(f"{API}/documents/{document['id']}").status_code == 204
    assert http.get(f"{API}/documents/{document['id']}").status_code == 404
    assert http.get(f"{API}/documents/{document['id']}/chunks").status_code == 404
    assert http.delete(f"{API}/documents/{document['id']}").status_code == 404
    assert chroma_ids(chroma_url, document["id"]) == []
    for mode in MODES:
        query = {"top_k": 50, "retrieval": {"mode": mode}}
        results = http.post(
            f"{API}/search", json={"query": CORPUS["sourdough"].question, **query}
        ).json()["results"]
        assert document["id"] not in {r["document_id"] for r in results}, mode
        answer = http.post(
            f"{API}/query", json={"question": CORPUS["sourdough"].question, **query}
        ).json()
        assert document["id"] not in {c["document_id"] for c in answer["citations"]}, mode
    originals = Path(stack.data_dir) / "originals"
    assert not [p for p in originals.rglob(document["sha256"]) if p.is_file()]
