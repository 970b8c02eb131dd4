"""POST /api/v1/query/stream through a real server answering with a real model (a llama.cpp
OpenAI-compatible server on loopback): a client that goes away stops the generation."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.api.test_streaming import API, events, ingest_corpus
from tests.conftest import UNLIMITED, Server, start_server
from tests.documents import CORPUS


@pytest.fixture(scope="module")
def with_llm(tmp_path_factory: pytest.TempPathFactory, llm_server: str) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("llm") / "data",
        answer_provider="openai",
        llm_base_url=llm_server,
        llm_model="smollm2",
        max_answer_tokens="200",
        **UNLIMITED,
    )
    yield running
    running.stop()


def test_a_client_that_disconnects_stops_the_generation(with_llm: Server) -> None:
    """The llama.cpp server answers one request at a time, so a generation left running after
    the client went away would hold up the next question for the rest of its tokens."""
    question = {"question": CORPUS["rust"].question, "top_k": 2}
    with with_llm.client() as http:
        ingest_corpus(http)
        started = time.monotonic()
        full = http.post(f"{API}/query", json=question).json()
        whole_answer = time.monotonic() - started
        with http.stream("POST", f"{API}/query/stream", json=question) as response:
            for name, _ in events(response):
                if name == "token":
                    break  # and leave: closing the response closes the connection
        started = time.monotonic()
        after = http.post(f"{API}/query", json=question)
        next_answer = time.monotonic() - started
    assert full["provider"] == "openai"
    assert after.status_code == 200
    # Had the abandoned generation gone on, the next answer would take about twice as long.
    assert next_answer < whole_answer * 1.6, (next_answer, whole_answer)
