"""Changing the embedding model: a server whose settings name another model than the one its
index was built with keeps answering from the old index, then `POST /reindex` moves the index
to the new model (SmolLM2 behind an OpenAI-compatible endpoint, 576 dimensions, after the
packaged MiniLM's 384). Searches then work in the new space alone, and Chroma holds one
collection of the new model's vectors: no mix of the two spaces."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromadb
import httpx
import numpy as np
import pytest

from impl.rag.store import chroma_settings, collection_name
from tests.conftest import UNLIMITED, start_server
from tests.llm.embedding_server import MODEL_NAME, start_embedding_server
from tests.llm.server import stop

API = "/api/v1"
TOPICS = {
    "lighthouse": "The lighthouse keeper trims the lamp wick at dusk and winds the clockwork.",
    "orchard": "Apple trees in the orchard are pruned in late winter before the buds open.",
    "glacier": "The glacier retreats each summer, leaving moraines of gravel in the valley.",
}


@pytest.fixture(scope="module")
def embedding_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, base_url = start_embedding_server(
        tmp_path_factory.mktemp("embed") / "embedding-server.log"
    )
    try:
        yield base_url
    finally:
        stop(process)


def search(http: httpx.Client, query: str, mode: str = "dense") -> list[dict[str, Any]]:
    response = http.post(
        f"{API}/search", json={"query": query, "top_k": 3, "retrieval": {"mode": mode}}
    )
    assert response.status_code == 200, response.text
    return list(response.json()["results"])


def tenant_collections(data: Path) -> list[tuple[str, int, list[int]]]:
    """The default tenant's collections as Chroma holds them: model, dimension recorded, and
    the width of every vector."""
    client = chromadb.PersistentClient(path=str(data / "chroma"), settings=chroma_settings())
    tenant_hash = collection_name("default").removeprefix("ragapi-tenant-")
    try:
        found = []
        for collection in client.list_collections():
            meta = collection.metadata or {}
            if collection.name == collection_name("default") or (
                meta.get("ragapi_tenant") == tenant_hash
            ):
                vectors = collection.get(include=["embeddings"])["embeddings"]
                found.append(
                    (
                        str(meta["ragapi_model_id"]),
                        int(meta["ragapi_dimension"]),
                        [len(v) for v in vectors],
                    )
                )
        return found
    finally:
        client.close()


def embed(base_url: str, text: str) -> np.ndarray[Any, np.dtype[np.float64]]:
    response = httpx.post(
        f"{base_url}/embeddings", json={"model": MODEL_NAME, "input": [text]}, timeout=120
    )
    vector = np.asarray(response.json()["data"][0]["embedding"], dtype=np.float64)
    return vector / np.linalg.norm(vector)


def test_a_model_change_answers_from_the_old_index_until_the_reindex_moves_it(
    tmp_path: Path, embedding_url: str
) -> None:
    data = tmp_path / "data"
    server = start_server(data, **UNLIMITED)
    key = server.api_key
    new_model = {
        "embedding_provider": "openai",
        "embedding_base_url": embedding_url,
        "embedding_model": MODEL_NAME,
    }
    try:
        with server.client() as http:
            for title, text in TOPICS.items():
                response = http.post(
                    f"{API}/ingest", params={"wait": "true"}, json={"text": text, "title": title}
                )
                assert response.status_code == 200, response.text
            packaged = http.get(f"{API}/reindex").json()["embedding_model"]
            [before] = search(http, "pruning apple trees", "dense")[:1]
        server.stop()

        server = start_server(data, **new_model, **UNLIMITED)
        with server.client(key) as http:
            # Not stuck: the old index answers, its questions embedded by the old model.
            index = http.get(f"{API}/reindex").json()
            assert index == {"embedding_model": packaged, "moving_to": None, "job": None}
            [hit] = search(http, "pruning apple trees", "dense")[:1]
            assert (hit["chunk_id"], hit["score"]) == (
                before["chunk_id"],
                pytest.approx(before["score"], abs=1e-4),
            )

            accepted = http.post(f"{API}/reindex")
            assert accepted.status_code == 202, accepted.text
            assert accepted.headers["location"] == f"{API}/reindex"
            moving = accepted.json()
            assert moving["job"] is None and moving["embedding_model"] == packaged
            target = {"model_id": f"openai:{MODEL_NAME}@{embedding_url}", "dimension": 576}
            assert {k: moving["moving_to"][k] for k in target} == target
            deadline = time.monotonic() + 300
            while index["moving_to"] is not None or index["embedding_model"] != target:
                assert time.monotonic() < deadline, index
                time.sleep(0.2)
                index = http.get(f"{API}/reindex").json()

            # The new space answers: each passage's score is the cosine of the question and
            # the passage, both embedded by the new model.
            for title, text in TOPICS.items():
                hits = search(http, text, "dense")
                assert hits[0]["document_title"] == title
                assert hits[0]["score"] == pytest.approx(
                    float(embed(embedding_url, text) @ embed(embedding_url, hits[0]["text"])),
                    abs=1e-3,
                )
            assert search(http, "orchard apple trees", "hybrid")
        server.stop(signal.SIGTERM)
        # One collection, the new model's, every vector 576 wide.
        [(model_id, dimension, widths)] = tenant_collections(data)
        assert (model_id, dimension) == (target["model_id"], 576)
        assert widths == [576] * len(TOPICS)
    finally:
        server.stop()


def test_a_move_killed_midway_answers_from_the_old_index_and_resumes(
    tmp_path: Path, embedding_url: str
) -> None:
    data = tmp_path / "data"
    server = start_server(data, **UNLIMITED)
    key = server.api_key
    new_model = {
        "embedding_provider": "openai",
        "embedding_base_url": embedding_url,
        "embedding_model": MODEL_NAME,
    }
    notes = [f"Ferry timetable note {i}: the boat leaves pier {i} at dawn." for i in range(30)]
    try:
        with server.client() as http:
            for i, text in enumerate(notes):
                response = http.post(f"{API}/ingest", json={"text": text, "title": f"note {i}"})
                assert response.status_code == 202, response.text
            last = response.json()["job"]["id"]
            deadline = time.monotonic() + 300
            while http.get(f"{API}/jobs/{last}").json()["status"] != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            packaged = http.get(f"{API}/reindex").json()["embedding_model"]
            before = search(http, "which pier does the ferry leave from", "dense")
        server.stop()

        server = start_server(data, **new_model, **UNLIMITED)
        with server.client(key) as http:
            assert http.post(f"{API}/reindex").status_code == 202
            deadline = time.monotonic() + 300
            index = http.get(f"{API}/reindex").json()
            while not 0 < index["moving_to"]["chunks_done"] < len(notes):
                assert time.monotonic() < deadline and index["moving_to"] is not None, index
                time.sleep(0.05)
                index = http.get(f"{API}/reindex").json()
        server.stop(signal.SIGKILL)
        # Killed midway: the old collection whole, the new one partly filled, never mixed.
        old, new = sorted(tenant_collections(data), key=lambda found: found[1])
        assert old == (packaged["model_id"], 384, [384] * len(notes))
        assert new[:2] == (f"openai:{MODEL_NAME}@{embedding_url}", 576)
        assert 0 < len(new[2]) < len(notes) and set(new[2]) == {576}

        server = start_server(data, **new_model, **UNLIMITED)
        with server.client(key) as http:
            # The old index answers, whole, while the move resumes (unless it is done by now).
            during = http.get(f"{API}/reindex").json()
            if during["moving_to"] is not None:
                assert during["embedding_model"] == packaged
                assert search(http, "which pier does the ferry leave from", "dense") == before
            deadline = time.monotonic() + 900  # SmolLM2 on a loaded CPU: seconds a chunk
            while during["moving_to"] is not None:
                assert time.monotonic() < deadline, during
                time.sleep(0.2)
                during = http.get(f"{API}/reindex").json()
            assert during["embedding_model"]["dimension"] == 576
            assert len(search(http, "which pier does the ferry leave from", "dense")) == 3
        server.stop()
        assert tenant_collections(data) == [(new[0], 576, [576] * len(notes))]
    finally:
        server.stop()
