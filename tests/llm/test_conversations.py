"""A conversation through a real server whose answer provider is a real model (SmolLM2-135M
behind a llama.cpp OpenAI-compatible server on loopback): the model rewrites the follow-up to
stand alone, and the rewritten question finds the passage the turn before makes it about."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chat_corpus import CLOSING, FIRST_QUESTION, FOLLOW_UP, ingest
from tests.conftest import UNLIMITED, Server, start_server

API = "/api/v1"


@pytest.fixture(scope="module")
def with_llm(tmp_path_factory: pytest.TempPathFactory, llm_server: str) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("llm-conversations") / "data",
        answer_provider="openai",
        llm_base_url=llm_server,
        llm_model="smollm2",
        max_answer_tokens="120",
        **UNLIMITED,
    )
    yield running
    running.stop()


def test_the_model_rewrites_a_follow_up_that_then_finds_the_right_passage(
    with_llm: Server,
) -> None:
    with with_llm.client() as http:
        ids = ingest(http)
        conversation = http.post(f"{API}/conversations", json={}).json()["id"]
        url = f"{API}/conversations/{conversation}/messages"
        first = http.post(url, json={"question": FIRST_QUESTION})
        assert first.status_code == 200, first.text
        second = http.post(url, json={"question": FOLLOW_UP, "top_k": 2})
        assert second.status_code == 200, second.text
        turn = second.json()
        # Retrieval alone, for the question the model wrote: what the answer was drawn from.
        hits = http.post(
            f"{API}/search", json={"query": turn["standalone_question"], "top_k": 1}
        ).json()["results"]
    assert turn["provider"] == "openai"
    assert turn["standalone_question"] != FOLLOW_UP
    assert "connection" in turn["standalone_question"].lower(), turn["standalone_question"]
    assert hits[0]["document_id"] == ids[CLOSING], (turn["standalone_question"], hits)
