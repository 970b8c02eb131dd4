"""The tenant-wide re-index through HTTP against a real server, embedded Chroma and the packaged
model: every document rebuilt from its stored original as one job (one whose original is gone
fails by name, the others go on), admin scope, and a SIGKILL in the middle that leaves exactly
one complete version of each document."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import chromadb
import httpx

from impl.rag.store import chroma_settings, collection_name
from tests.conftest import UNLIMITED, Server, create_key, start_server

API = "/api/v1"


def ingest(http: httpx.Client, text: str, title: str) -> dict[str, Any]:
    response = http.post(
        f"{API}/ingest", params={"wait": "true"}, json={"text": text, "title": title}
    )
    assert response.status_code == 200, response.text
    [document] = response.json()["documents"]
    return dict(document)


def wait_for(http: httpx.Client, job_id: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = http.get(f"{API}/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def lines(word: str, count: int) -> str:
    return " ".join(
        f"Lighthouse keeper log {i} of the {word} station: the lamp was trimmed at dusk."
        for i in range(count)
    )


def answers_as(http: httpx.Client, doc_id: str, word: str, version: int) -> int:
    """The document answers as exactly this version, whole: its record, every chunk row, and
    every hit of every retrieval mode. Its chunk count."""
    document = http.get(f"{API}/documents/{doc_id}").json()
    assert (document["status"], document["version"]) == ("ready", version), document
    chunks = http.get(f"{API}/documents/{doc_id}/chunks", params={"limit": 100}).json()["items"]
    assert len(chunks) == document["chunk_count"] and all(word in c["text"] for c in chunks)
    marker = f"{doc_id}-v{version}-" if version > 1 else f"{doc_id}-"
    for mode in ("dense", "lexical", "hybrid"):
        response = http.post(
            f"{API}/search",
            json={
                "query": "lighthouse keeper lamp trimmed",
                "top_k": 10,
                "retrieval": {"mode": mode},
                "filters": {"document_ids": [doc_id]},
            },
        )
        hits = response.json()["results"]
        assert hits, (mode, response.text)
        assert all(h["chunk_id"].startswith(marker) and word in h["text"] for h in hits), hits
        assert version == 1 or all("-v" in h["chunk_id"] for h in hits)
    return int(document["chunk_count"])


def vector_ids(data: Path) -> list[str]:
    """Every vector id of the default tenant, read from Chroma's files (the server stopped)."""
    client = chromadb.PersistentClient(path=str(data / "chroma"), settings=chroma_settings())
    try:
        return list(client.get_collection(collection_name("default")).get(include=[])["ids"])
    finally:
        client.close()


def remove_stored_text(data: Path, doc_id: str) -> None:
    """What an operator's mishap does: the document's stored text is gone from the folder."""
    with sqlite3.connect(data / "registry.db") as registry:
        [(key,)] = registry.execute("SELECT extracted_key FROM documents WHERE id = ?", (doc_id,))
    (data / "originals" / key[:2] / key[2:4] / key).unlink()


def test_a_tenant_reindex_rebuilds_every_document_and_names_the_one_it_cannot(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    server: Server = start_server(data, chunk_tokens="200", **UNLIMITED)
    admin = server.api_key
    try:
        with server.client() as http:
            words = ("north", "south", "east")
            made = {w: ingest(http, lines(w, 40), f"{w.title()} log") for w in words}
        server.stop()
        remove_stored_text(data, made["east"]["id"])
        # Smaller chunks from now on: the stored texts are cut again, nothing is uploaded.
        server = start_server(data, chunk_tokens="64", chunk_overlap_tokens="8", **UNLIMITED)
        writer = create_key(server, "default", "write")
        with server.client(writer) as http:
            refused = http.post(f"{API}/reindex")
            assert refused.status_code == 403, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
        with server.client(admin) as http:
            accepted = http.post(f"{API}/reindex")
            assert accepted.status_code == 202, accepted.text
            body = accepted.json()
            job = body["job"]
            assert accepted.headers["location"] == f"{API}/jobs/{job['id']}"
            assert body["moving_to"] is None
            assert body["embedding_model"]["model_id"].startswith("onnx:all-MiniLM-L6-v2-int8:")
            assert body["embedding_model"]["dimension"] == 384
            assert sorted(job["document_ids"]) == sorted(d["id"] for d in made.values())
            finished = wait_for(http, job["id"])
            # The document without its stored text fails by name; the others were rebuilt.
            assert finished["status"] == "failed", finished
            assert (
                f"the stored copy of document {made['east']['id']} is missing"
                in (finished["error"]["detail"])
            )
            for word in ("north", "south"):
                rebuilt = answers_as(http, made[word]["id"], word, 2)
                assert rebuilt > made[word]["chunk_count"]
            assert answers_as(http, made["east"]["id"], "east", 1) == made["east"]["chunk_count"]
            index = http.get(f"{API}/reindex").json()
            assert index == {**body, "job": None}
    finally:
        server.stop()


def test_a_tenant_reindex_killed_midway_leaves_one_complete_version_of_each(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    server = start_server(data, chunk_tokens="200", **UNLIMITED)
    key = server.api_key
    words = ("alpha", "beta", "gamma")
    try:
        with server.client() as http:
            ids = {w: ingest(http, lines(w, 120), f"{w} log")["id"] for w in words}
        server.stop()
        server = start_server(data, chunk_tokens="48", chunk_overlap_tokens="8", **UNLIMITED)
        with server.client(key) as http:
            job = http.post(f"{API}/reindex").json()["job"]
            deadline = time.monotonic() + 300
            while job["chunks_done"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
                job = http.get(f"{API}/jobs/{job['id']}").json()
            assert job["status"] == "running" and 0 < job["chunks_done"] < job["chunks_total"], job
        server.stop(signal.SIGKILL)

        server = start_server(data, chunk_tokens="48", chunk_overlap_tokens="8", **UNLIMITED)
        with server.client(key) as http:
            # Each document answers as one whole version while the job runs again.
            for word in words:
                version = http.get(f"{API}/documents/{ids[word]}").json()["version"]
                answers_as(http, ids[word], word, version)
            assert wait_for(http, job["id"])["status"] == "succeeded"
            counts = {word: answers_as(http, ids[word], word, 2) for word in words}
        server.stop()
        # Chroma holds exactly the new versions' vectors: nothing of version 1, no extra.
        held = vector_ids(data)
        assert sorted(held) == sorted(f"{ids[w]}-v2-{i}" for w in words for i in range(counts[w]))
    finally:
        server.stop()
