"""POST /api/v1/query/stream through a real server: event order, tokens that add up to the
answer, citations and error events. A client that goes away from a real model's answer:
tests/llm/test_api_streaming.py."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import UNLIMITED, Server, free_port, start_server
from tests.documents import CORPUS, make_text

API = "/api/v1"


def events(response: httpx.Response) -> Iterator[tuple[str, dict]]:  # type: ignore[type-arg]
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert name is not None
            yield name, json.loads(line.removeprefix("data: "))
            name = None


def ingest_corpus(http: httpx.Client) -> dict[str, str]:
    files = [
        ("files", (f"{key}.txt", make_text(doc.paragraphs), "text/plain"))
        for key, doc in CORPUS.items()
    ]
    body = http.post(f"{API}/ingest", params={"wait": "true"}, files=files).json()
    assert body["job"]["status"] == "succeeded"
    return {key: doc["id"] for key, doc in zip(CORPUS, body["documents"], strict=True)}


@pytest.fixture(scope="module")
def corpus(server: Server) -> dict[str, str]:
    with server.client() as http:
        return ingest_corpus(http)


def test_retrieval_then_tokens_then_done(server: Server, corpus: dict[str, str]) -> None:
    question = CORPUS["photosynthesis"].question
    with (
        server.client() as http,
        http.stream(
            "POST", f"{API}/query/stream", json={"question": question, "top_k": 3}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = list(events(response))
    names = [name for name, _ in received]
    assert names[0] == "retrieval"
    assert names[-1] == "done" and names.count("done") == 1
    assert set(names[1:-1]) == {"token"}
    retrieval, done = received[0][1], received[-1][1]
    assert retrieval["results"][0]["document_id"] == corpus["photosynthesis"]
    assert "".join(data["text"] for name, data in received if name == "token") == done["answer"]
    assert done["found"] is True
    cited = {c["chunk_id"] for c in done["citations"]}
    assert cited and cited <= {r["chunk_id"] for r in retrieval["results"]}
    with server.client() as http:
        plain = http.post(f"{API}/query", json={"question": question, "top_k": 3}).json()
    assert plain["answer"] == done["answer"]
    assert plain["citations"] == done["citations"]


def test_errors_before_the_stream_are_problems(server: Server) -> None:
    with server.client() as http:
        response = http.post(f"{API}/query/stream", json={"question": ""})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"


@pytest.fixture(scope="module")
def broken_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose LLM endpoint is a closed loopback port."""
    running = start_server(
        tmp_path_factory.mktemp("broken") / "data",
        answer_provider="openai",
        llm_base_url=f"http://127.0.0.1:{free_port()}/v1",
        llm_timeout_seconds="5",
        **UNLIMITED,
    )
    yield running
    running.stop()


def test_a_failing_model_midway_is_an_error_event(broken_llm: Server) -> None:
    with broken_llm.client() as http:
        ingest_corpus(http)
        with http.stream(
            "POST", f"{API}/query/stream", json={"question": CORPUS["saturn"].question}
        ) as response:
            assert response.status_code == 200
            received = list(events(response))
    assert [name for name, _ in received] == ["retrieval", "error"]
    problem = received[1][1]
    assert problem["status"] == 502
    assert problem["type"] == "urn:ragapi:problem:upstream-error"
