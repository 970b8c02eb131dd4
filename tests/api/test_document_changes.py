"""Documents that change, through HTTP against a real server and a real Chroma server: merge
patches of title and metadata (the vectors' metadata changed in place), entity tags and
conditional requests, replacement by a new version under the same id (searched while it
happens, and interrupted by SIGKILL), the job listing and cancellation, and idempotent
ingest."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromadb
import httpx
import pytest

from impl.rag.store import collection_name
from tests.conftest import UNLIMITED, Server, start_server

API = "/api/v1"
MERGE_PATCH = {"content-type": "application/merge-patch+json"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, chroma_url: str) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("changes") / "data", chroma_url=chroma_url, **UNLIMITED
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(stack: Server) -> Iterator[httpx.Client]:
    with stack.client() as client:
        yield client


def vectors(chroma_url: str, document_id: str) -> dict[str, dict[str, Any]]:
    """The document's vectors as Chroma holds them: metadata by id."""
    host, port = chroma_url.removeprefix("http://").split(":")
    client = chromadb.HttpClient(host=host, port=int(port))
    found = client.get_collection(collection_name("default")).get(
        where={"document_id": document_id}, include=["metadatas"]
    )
    return {i: dict(m or {}) for i, m in zip(found["ids"], found["metadatas"] or [], strict=True)}


def ingest(http: httpx.Client, text: str, **fields: Any) -> dict[str, Any]:
    response = http.post(f"{API}/ingest", params={"wait": "true"}, json={"text": text, **fields})
    assert response.status_code == 200, response.text
    [document] = response.json()["documents"]
    assert document["status"] == "ready"
    return dict(document)


def wait_for(http: httpx.Client, job_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = http.get(f"{API}/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def search(http: httpx.Client, query: str, **fields: Any) -> list[dict[str, Any]]:
    response = http.post(f"{API}/search", json={"query": query, "top_k": 10, **fields})
    assert response.status_code == 200, response.text
    return list(response.json()["results"])


def lines(word: str, count: int) -> str:
    """A text of ``count`` sentences, each naming ``word`` (which version a passage is of)."""
    return " ".join(
        f"Harbour pilot notice {i} of the {word} edition: tugs meet ships at the breakwater."
        for i in range(count)
    )


# -- patch and entity tags ------------------------------------------------------------------


def test_a_merge_patch_changes_title_and_metadata_in_place(
    http: httpx.Client, chroma_url: str
) -> None:
    document = ingest(
        http,
        "Kelp forests grow along cold rocky coasts and shelter sea otters.",
        title="Kelp",
        metadata={"team": "marine", "draft": True, "year": 2025},
    )
    doc_id = document["id"]
    before = vectors(chroma_url, doc_id)
    etag = http.get(f"{API}/documents/{doc_id}").headers["etag"]

    patched = http.patch(
        f"{API}/documents/{doc_id}",
        json={"title": "Kelp forests", "metadata": {"team": "ocean", "draft": None}},
        headers={**MERGE_PATCH, "If-Match": etag},
    )
    assert patched.status_code == 200, patched.text
    body = patched.json()
    assert body["title"] == "Kelp forests"
    assert body["metadata"] == {"team": "ocean", "year": 2025}
    assert body["version"] == 1 and body["sha256"] == document["sha256"]
    assert patched.headers["etag"] != etag
    assert http.get(f"{API}/documents/{doc_id}").headers["etag"] == patched.headers["etag"]

    # Nothing was embedded again: the same vectors, their metadata changed in place.
    after = vectors(chroma_url, doc_id)
    assert after.keys() == before.keys()
    for meta in after.values():
        assert meta["m_team"] == "ocean" and "m_draft" not in meta and meta["m_year"] == 2025
    # Every mode's filters see the change as soon as the answer came.
    for mode in ("dense", "lexical", "hybrid"):
        found = search(
            http,
            "kelp forests sea otters",
            retrieval={"mode": mode},
            filters={"metadata": {"team": "ocean"}},
        )
        assert {hit["document_id"] for hit in found} == {doc_id}
        assert found[0]["document_title"] == "Kelp forests"
        old = search(
            http,
            "kelp forests sea otters",
            retrieval={"mode": mode},
            filters={"metadata": {"team": "marine"}},
        )
        assert doc_id not in {hit["document_id"] for hit in old}

    cleared = http.patch(f"{API}/documents/{doc_id}", json={"metadata": None}, headers=MERGE_PATCH)
    assert cleared.status_code == 200 and cleared.json()["metadata"] == {}
    assert all(not k.startswith("m_") for m in vectors(chroma_url, doc_id).values() for k in m)


def test_a_patch_is_refused_when_it_is_not_a_merge_patch_or_breaks_the_bounds(
    http: httpx.Client,
) -> None:
    doc_id = ingest(http, "Lichen is a partnership of a fungus and an alga.")["id"]
    as_json = http.patch(f"{API}/documents/{doc_id}", json={"title": "Lichen"})
    assert as_json.status_code == 415
    too_many = {f"k{i}": i for i in range(33)}
    refused = http.patch(
        f"{API}/documents/{doc_id}", json={"metadata": too_many}, headers=MERGE_PATCH
    )
    assert refused.status_code == 400
    assert refused.headers["content-type"] == "application/problem+json"
    missing = http.patch(f"{API}/documents/doc_nothere", json={"title": "x"}, headers=MERGE_PATCH)
    assert missing.status_code == 404


def test_conditional_requests_follow_the_entity_tag(http: httpx.Client) -> None:
    doc_id = ingest(http, "Tide pools hold anemones, limpets and small crabs.")["id"]
    first = http.get(f"{API}/documents/{doc_id}")
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')

    unchanged = http.get(f"{API}/documents/{doc_id}", headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["etag"] == etag
    assert (
        http.get(f"{API}/documents/{doc_id}", headers={"If-None-Match": '"other"'}).status_code
        == 200
    )

    changed = http.patch(
        f"{API}/documents/{doc_id}", json={"title": "Tide pools"}, headers=MERGE_PATCH
    )
    assert changed.status_code == 200
    stale = {"If-Match": etag}
    refused = http.patch(
        f"{API}/documents/{doc_id}", json={"title": "Lost update"}, headers={**MERGE_PATCH, **stale}
    )
    assert refused.status_code == 412
    assert refused.json()["type"] == "urn:ragapi:problem:precondition-failed"
    assert http.delete(f"{API}/documents/{doc_id}", headers=stale).status_code == 412
    replaced = http.put(f"{API}/documents/{doc_id}", json={"text": "New text."}, headers=stale)
    assert replaced.status_code == 412
    kept = http.get(f"{API}/documents/{doc_id}").json()
    assert kept["title"] == "Tide pools" and kept["version"] == 1
    # A weak tag never satisfies If-Match (strong comparison).
    weak = {"If-Match": f"W/{changed.headers['etag']}"}
    assert http.delete(f"{API}/documents/{doc_id}", headers=weak).status_code == 412
    current = {"If-Match": changed.headers["etag"]}
    assert http.delete(f"{API}/documents/{doc_id}", headers=current).status_code == 204
    assert http.get(f"{API}/documents/{doc_id}").status_code == 404


def test_a_server_can_require_if_match(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", require_if_match="true", **UNLIMITED)
    try:
        with server.client() as http:
            doc_id = ingest(http, "Mangroves grow where rivers meet the sea.")["id"]
            for response in (
                http.patch(f"{API}/documents/{doc_id}", json={"title": "x"}, headers=MERGE_PATCH),
                http.put(f"{API}/documents/{doc_id}", json={"text": "Other text."}),
                http.delete(f"{API}/documents/{doc_id}"),
            ):
                assert response.status_code == 428, response.text
                assert response.json()["type"] == "urn:ragapi:problem:precondition-required"
            etag = http.get(f"{API}/documents/{doc_id}").headers["etag"]
            deleted = http.delete(f"{API}/documents/{doc_id}", headers={"If-Match": etag})
            assert deleted.status_code == 204
    finally:
        server.stop()


# -- replace ----------------------------------------------------------------------------------


def test_a_replacement_keeps_the_id_and_swaps_the_version(
    http: httpx.Client, chroma_url: str
) -> None:
    first = ingest(http, lines("spring", 12), title="Pilot notices", metadata={"port": "north"})
    doc_id = first["id"]
    old_vectors = vectors(chroma_url, doc_id)

    response = http.put(
        f"{API}/documents/{doc_id}", params={"wait": "true"}, json={"text": lines("autumn", 20)}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["job"]["status"] == "succeeded" and body["job"]["document_ids"] == [doc_id]
    [document] = body["documents"]
    assert document["id"] == doc_id and document["version"] == 2
    assert document["title"] == "Pilot notices" and document["metadata"] == {"port": "north"}
    assert document["sha256"] != first["sha256"] and document["status"] == "ready"

    # Only the new version's vectors are left, each carrying the version.
    held = vectors(chroma_url, doc_id)
    assert not held.keys() & old_vectors.keys()
    assert len(held) == document["chunk_count"] and {m["version"] for m in held.values()} == {2}
    chunks = http.get(f"{API}/documents/{doc_id}/chunks", params={"limit": 100}).json()["items"]
    assert len(chunks) == document["chunk_count"]
    assert all("autumn" in chunk["text"] for chunk in chunks)
    for mode in ("dense", "lexical", "hybrid"):
        found = [
            hit
            for hit in search(http, "harbour pilot notice tugs", retrieval={"mode": mode})
            if hit["document_id"] == doc_id
        ]
        assert found and all("autumn" in hit["text"] for hit in found), mode

    # The same content again changes nothing.
    again = http.put(f"{API}/documents/{doc_id}", json={"text": lines("autumn", 20)})
    assert again.status_code == 200
    assert again.json()["job"]["status"] == "succeeded"
    assert again.json()["job"]["duplicate_document_ids"] == [doc_id]
    assert http.get(f"{API}/documents/{doc_id}").json()["version"] == 2


def test_a_replacement_is_refused_when_it_cannot_be_one(http: httpx.Client) -> None:
    holder = ingest(http, "Salt marshes filter water flowing into estuaries.")
    other = ingest(http, "Seagrass meadows store carbon in their roots.")
    taken = http.put(
        f"{API}/documents/{other['id']}",
        json={"text": "Salt marshes filter water flowing into estuaries."},
    )
    assert taken.status_code == 409, taken.text
    assert taken.json()["type"] == "urn:ragapi:problem:conflict"
    two = http.put(
        f"{API}/documents/{other['id']}",
        files=[
            ("files", ("a.txt", b"one file", "text/plain")),
            ("files", ("b.txt", b"two", "text/plain")),
        ],
    )
    assert two.status_code == 400
    missing = http.put(f"{API}/documents/doc_nothere", json={"text": "Anything."})
    assert missing.status_code == 404
    assert http.get(f"{API}/documents/{holder['id']}").json()["version"] == 1


def test_every_search_during_a_replacement_sees_exactly_one_version(http: httpx.Client) -> None:
    doc_id = ingest(http, lines("winter", 150), title="Winter notices")["id"]
    versions_seen: list[set[str]] = []
    stop = threading.Event()
    failures: list[str] = []

    def keep_searching() -> None:
        with httpx.Client(base_url=str(http.base_url), headers=http.headers, timeout=60) as own:
            while not stop.is_set():
                hits = [
                    hit
                    for hit in search(own, "harbour pilot notice edition tugs breakwater")
                    if hit["document_id"] == doc_id
                ]
                if not hits:
                    failures.append("a search found neither version")
                found = {
                    word for hit in hits for word in ("winter", "summer") if word in hit["text"]
                }
                versions_seen.append(found)

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        time.sleep(1)
        accepted = http.put(f"{API}/documents/{doc_id}", json={"text": lines("summer", 150)})
        assert accepted.status_code == 202, accepted.text
        job = wait_for(http, accepted.json()["job"]["id"])
        assert job["status"] == "succeeded", job
        time.sleep(1)
    finally:
        stop.set()
        searcher.join(timeout=120)
    assert not failures, failures[:3]
    assert versions_seen and all(len(found) == 1 for found in versions_seen), [
        found for found in versions_seen if len(found) != 1
    ][:3]
    # Both versions were seen: the searches overlapped the replacement.
    assert versions_seen[0] == {"winter"} and versions_seen[-1] == {"summer"}


def one_complete_version(http: httpx.Client, doc_id: str, word: str, version: int) -> None:
    """The document answers as exactly this version: its record, every chunk, every hit."""
    document = http.get(f"{API}/documents/{doc_id}").json()
    assert (document["status"], document["version"]) == ("ready", version), document
    chunks = http.get(f"{API}/documents/{doc_id}/chunks", params={"limit": 100}).json()
    assert chunks["next_cursor"] is None or document["chunk_count"] > 100
    assert len(chunks["items"]) == min(document["chunk_count"], 100)
    assert all(word in chunk["text"] for chunk in chunks["items"])
    for mode in ("dense", "lexical", "hybrid"):
        hits = search(
            http,
            "harbour pilot notice tugs",
            retrieval={"mode": mode},
            filters={"document_ids": [doc_id]},
        )
        assert hits and all(word in hit["text"] for hit in hits), (mode, hits[:2])


def test_a_replacement_killed_midway_leaves_exactly_one_complete_version(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(data, **UNLIMITED)
    key = server.api_key  # printed on the first start only
    try:
        with server.client() as http:
            doc_id = ingest(http, lines("first", 30), title="Notices")["id"]
            accepted = http.put(f"{API}/documents/{doc_id}", json={"text": lines("second", 1000)})
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["job"]["id"]
            deadline = time.monotonic() + 300
            job = accepted.json()["job"]
            while job["chunks_done"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
                job = http.get(f"{API}/jobs/{job_id}").json()
            assert job["status"] == "running" and 0 < job["chunks_done"] < job["chunks_total"], job
        server.stop(signal.SIGKILL)

        server = start_server(data, **UNLIMITED)
        with server.client(key) as http:
            # The first version answers, whole, while the replacement runs again.
            one_complete_version(http, doc_id, "first", 1)
            job = wait_for(http, job_id)
            assert job["status"] == "succeeded", job
            one_complete_version(http, doc_id, "second", 2)
    finally:
        server.stop()


def test_a_reindex_under_new_chunk_settings_swaps_in_a_new_version(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(data, chunk_tokens="200", **UNLIMITED)
    key = server.api_key
    try:
        with server.client() as http:
            first = ingest(http, lines("equinox", 60), title="Equinox notices")
        server.stop()
        # Smaller chunks from now on: the stored text is cut again, nothing is uploaded.
        server = start_server(data, chunk_tokens="64", chunk_overlap_tokens="8", **UNLIMITED)
        with server.client(key) as http:
            etag = http.get(f"{API}/documents/{first['id']}").headers["etag"]
            response = http.post(
                f"{API}/documents/{first['id']}/reindex",
                params={"wait": "true"},
                headers={"If-Match": etag},
            )
            assert response.status_code == 200, response.text
            [document] = response.json()["documents"]
            assert document["version"] == 2 and document["sha256"] == first["sha256"]
            assert document["chunk_count"] > first["chunk_count"]
            one_complete_version(http, first["id"], "equinox", 2)
            stale = http.post(f"{API}/documents/{first['id']}/reindex", headers={"If-Match": etag})
            assert stale.status_code == 412
    finally:
        server.stop()


# -- jobs -----------------------------------------------------------------------------------


def test_jobs_are_listed_newest_first_and_filtered_by_status(http: httpx.Client) -> None:
    made = [
        http.post(f"{API}/ingest", json={"text": f"Buoy {i} marks the channel."}).json()["job"][
            "id"
        ]
        for i in range(3)
    ]
    for job_id in made:
        assert wait_for(http, job_id)["status"] == "succeeded"
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "status": "succeeded"}
        if cursor:
            params["cursor"] = cursor
        page = http.get(f"{API}/jobs", params=params).json()
        assert all(job["status"] == "succeeded" for job in page["items"])
        seen += [job["id"] for job in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert [job_id for job_id in seen if job_id in made] == made[::-1]
    assert http.get(f"{API}/jobs", params={"status": "cancelled", "limit": 100}).json()[
        "items"
    ] == [
        job
        for job in http.get(f"{API}/jobs", params={"limit": 100}).json()["items"]
        if job["status"] == "cancelled"
    ]
    assert http.get(f"{API}/jobs", params={"status": "stuck"}).status_code == 400


def test_cancelling_stops_queued_and_running_jobs_leaving_nothing_half_written(
    http: httpx.Client, chroma_url: str
) -> None:
    running = http.post(f"{API}/ingest", json={"text": lines("gale", 1000)}).json()["job"]
    queued = http.post(f"{API}/ingest", json={"text": lines("calm", 5)}).json()["job"]
    deadline = time.monotonic() + 300
    job = running
    while job["chunks_done"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        job = http.get(f"{API}/jobs/{running['id']}").json()
    assert job["status"] == "running", job

    cancelled = http.post(f"{API}/jobs/{queued['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["cancel_requested"]
    stopping = http.post(f"{API}/jobs/{running['id']}/cancel")
    assert stopping.status_code == 200 and stopping.json()["cancel_requested"]
    assert wait_for(http, running["id"])["status"] == "cancelled"

    for job_id in (running["id"], queued["id"]):
        [doc_id] = http.get(f"{API}/jobs/{job_id}").json()["document_ids"]
        document = http.get(f"{API}/documents/{doc_id}").json()
        assert document["status"] == "failed" and document["error"] == "ingestion was cancelled"
        assert document["chunk_count"] == 0
        assert http.get(f"{API}/documents/{doc_id}/chunks").json()["items"] == []
        assert vectors(chroma_url, doc_id) == {}
    again = http.post(f"{API}/jobs/{running['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    finished = http.post(f"{API}/ingest", params={"wait": "true"}, json={"text": "Fog horn."})
    done = http.post(f"{API}/jobs/{finished.json()['job']['id']}/cancel")
    assert done.status_code == 409
    assert http.post(f"{API}/jobs/job_nothere/cancel").status_code == 404


def test_a_cancelled_replacement_leaves_the_current_version(http: httpx.Client) -> None:
    doc_id = ingest(http, lines("dawn", 10), title="Dawn notices")["id"]
    accepted = http.put(f"{API}/documents/{doc_id}", json={"text": lines("dusk", 1000)})
    assert accepted.status_code == 202
    job_id = accepted.json()["job"]["id"]
    # While a replacement is under way, the document takes no patch and no other replacement.
    patched = http.patch(f"{API}/documents/{doc_id}", json={"title": "x"}, headers=MERGE_PATCH)
    assert patched.status_code == 409, patched.text
    second = http.put(f"{API}/documents/{doc_id}", json={"text": lines("night", 3)})
    assert second.status_code == 409, second.text
    assert http.post(f"{API}/jobs/{job_id}/cancel").status_code == 200
    assert wait_for(http, job_id)["status"] == "cancelled"
    one_complete_version(http, doc_id, "dawn", 1)
    # A replacement can be made again afterwards.
    again = http.put(
        f"{API}/documents/{doc_id}", params={"wait": "true"}, json={"text": lines("noon", 10)}
    )
    assert again.status_code == 200 and again.json()["documents"][0]["version"] == 2


# -- idempotent ingest ------------------------------------------------------------------------


def test_an_idempotency_key_replays_the_first_response(http: httpx.Client) -> None:
    body = {"text": "The lighthouse at Cape Wrath was built in 1828.", "title": "Cape Wrath"}
    key = {"Idempotency-Key": "retry-7f3a"}
    first = http.post(f"{API}/ingest", json=body, headers=key)
    assert first.status_code == 202, first.text
    retried = http.post(f"{API}/ingest", json=body, headers=key)
    assert retried.status_code == 202
    assert retried.json() == first.json()
    assert retried.headers["location"] == first.headers["location"]
    job = wait_for(http, first.json()["job"]["id"])
    # Nothing was stored twice: one document, one job.
    titled = http.get(f"{API}/documents", params={"title": "Cape Wrath"}).json()["items"]
    assert [d["id"] for d in titled] == job["document_ids"]

    other = http.post(f"{API}/ingest", json={**body, "text": "Another text."}, headers=key)
    assert other.status_code == 422
    assert other.json()["type"] == "urn:ragapi:problem:idempotency-key-reused"
    assert (
        http.post(f"{API}/ingest", json=body, headers={"Idempotency-Key": "bad key"}).status_code
        == 400
    )
    # A request that failed leaves its key free for the corrected retry.
    failing = {"Idempotency-Key": "retry-empty"}
    assert (
        http.post(
            f"{API}/ingest", files=[("files", ("e.txt", b"", "text/plain"))], headers=failing
        ).status_code
        == 400
    )
    fixed = http.post(f"{API}/ingest", json={"text": "Fixed."}, headers=failing)
    assert fixed.status_code == 202
