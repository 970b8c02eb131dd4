"""Conversations through a real server, with the extractive default: a follow-up that needs the
turn before it finds the right passage, turns are stored with their citations, streamed turns
are the same events as /query/stream, and conversations belong to their tenant."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from tests.chat_corpus import CLOSING, FIRST_QUESTION, FOLLOW_UP, ingest
from tests.conftest import UNLIMITED, Server, create_key, start_server

API = "/api/v1"


@pytest.fixture(scope="module")
def tenant_client(server: Server) -> Iterator[httpx.Client]:
    """A tenant of its own, holding only the chat corpus."""
    key = create_key(server, "conversations", "read,write")
    with server.client(key) as http:
        ingest(http)
        yield http


@pytest.fixture(scope="module")
def titles(tenant_client: httpx.Client) -> dict[str, str]:
    """Document titles by id."""
    page = tenant_client.get(f"{API}/documents", params={"limit": 100}).json()
    return {doc["id"]: doc["title"] for doc in page["items"]}


def start(http: httpx.Client, title: str | None = None) -> str:
    answer = http.post(f"{API}/conversations", json={} if title is None else {"title": title})
    assert answer.status_code == 201, answer.text
    assert answer.headers["location"] == f"{API}/conversations/{answer.json()['id']}"
    return str(answer.json()["id"])


def ask(http: httpx.Client, conversation: str, question: str) -> dict:  # type: ignore[type-arg]
    answer = http.post(f"{API}/conversations/{conversation}/messages", json={"question": question})
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


def test_a_follow_up_finds_the_passage_the_previous_turn_makes_it_about(
    tenant_client: httpx.Client, titles: dict[str, str]
) -> None:
    conversation = start(tenant_client, "Databases")
    first = ask(tenant_client, conversation, FIRST_QUESTION)
    assert first["found"] and "connect()" in first["answer"]

    second = ask(tenant_client, conversation, FOLLOW_UP)
    assert second["question"] == FOLLOW_UP
    assert second["standalone_question"] == "How do I close the database connection?"
    assert second["found"]
    assert "close() method" in second["answer"]
    cited = [titles[c["document_id"]] for c in second["citations"]]
    assert cited[0] == CLOSING
    assert not set(cited) & {"Closing application windows", "Closing a ticket"}
    assert all(c["quote"] in second["answer"] for c in second["citations"])

    # The same words without the conversation are about windows or tickets as much as
    # databases: the turn before is what picks the passage.
    alone = tenant_client.post(f"{API}/query", json={"question": FOLLOW_UP}).json()
    assert titles[alone["citations"][0]["document_id"]] != CLOSING, alone

    stored = tenant_client.get(f"{API}/conversations/{conversation}").json()
    assert stored["title"] == "Databases" and stored["turn_count"] == 2
    assert [t["question"] for t in stored["turns"]] == [FIRST_QUESTION, FOLLOW_UP]
    assert [t["index"] for t in stored["turns"]] == [0, 1]
    assert stored["turns"][1] == second  # stored with its citations, as answered


def test_what_about_asks_the_previous_question_of_another_subject(
    tenant_client: httpx.Client, titles: dict[str, str]
) -> None:
    conversation = start(tenant_client)
    ask(tenant_client, conversation, "How do I close a database connection?")
    turn = ask(tenant_client, conversation, "what about a support ticket?")
    assert turn["standalone_question"] == "How do I close a support ticket?"
    assert titles[turn["citations"][0]["document_id"]] == "Closing a ticket"


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    found = []
    name = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert name is not None
            found.append((name, json.loads(line.removeprefix("data: "))))
    return found


def test_a_streamed_turn_sends_retrieval_tokens_and_the_stored_turn(
    tenant_client: httpx.Client, titles: dict[str, str]
) -> None:
    conversation = start(tenant_client)
    ask(tenant_client, conversation, FIRST_QUESTION)
    with tenant_client.stream(
        "POST",
        f"{API}/conversations/{conversation}/messages",
        json={"question": FOLLOW_UP, "stream": True},
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = sse_events(response)
    names = [name for name, _ in received]
    assert names[0] == "retrieval" and names[-1] == "done"
    assert set(names[1:-1]) == {"token"}
    done = received[-1][1]
    assert "".join(data["text"] for name, data in received if name == "token") == done["answer"]
    assert titles[done["citations"][0]["document_id"]] == CLOSING
    stored = tenant_client.get(f"{API}/conversations/{conversation}").json()
    assert stored["turns"][-1] == done


def test_conversations_are_listed_newest_first_a_page_at_a_time(server: Server) -> None:
    with server.client(create_key(server, "conversation-pages", "read")) as http:
        made = [start(http, f"chat {n}") for n in range(5)]
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, str | int] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = http.get(f"{API}/conversations", params=params).json()
            assert len(page["items"]) <= 2
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == made[::-1]
        bad = http.get(f"{API}/conversations", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 400
        assert bad.headers["content-type"] == "application/problem+json"


def test_a_conversation_belongs_to_its_tenant_and_is_gone_once_deleted(
    server: Server, tenant_client: httpx.Client
) -> None:
    conversation = start(tenant_client)
    ask(tenant_client, conversation, FIRST_QUESTION)
    with server.client(create_key(server, "someone-else", "read")) as other:
        for method in ("GET", "DELETE"):
            answer = other.request(method, f"{API}/conversations/{conversation}")
            assert answer.status_code == 404
        asked = other.post(
            f"{API}/conversations/{conversation}/messages", json={"question": "anything?"}
        )
        assert asked.status_code == 404
        assert conversation not in [
            c["id"] for c in other.get(f"{API}/conversations").json()["items"]
        ]
    assert tenant_client.delete(f"{API}/conversations/{conversation}").status_code == 204
    assert tenant_client.get(f"{API}/conversations/{conversation}").status_code == 404
    registry = sqlite3.connect(f"file:{server.data_dir / 'registry.db'}?mode=ro", uri=True)
    with closing(registry):
        turns = registry.execute(
            "SELECT count(*) FROM conversation_turns WHERE conversation_id = ?", (conversation,)
        ).fetchone()[0]
    assert turns == 0  # its turns went with it
    assert tenant_client.delete(f"{API}/conversations/{conversation}").status_code == 404


def test_a_conversation_that_does_not_exist_is_a_404_problem(tenant_client: httpx.Client) -> None:
    answer = tenant_client.post(
        f"{API}/conversations/conv_missing/messages", json={"question": FOLLOW_UP}
    )
    assert answer.status_code == 404
    assert answer.json()["type"] == "urn:ragapi:problem:not-found"


def test_every_key_of_the_tenant_shares_its_conversations_unless_they_are_per_key(
    server: Server, tmp_path: Path
) -> None:
    tenant_wide = [create_key(server, "shared", "read", name=n) for n in ("one", "two")]
    with server.client(tenant_wide[0]) as first, server.client(tenant_wide[1]) as second:
        conversation = start(first)
        assert second.get(f"{API}/conversations/{conversation}").status_code == 200

    per_key = start_server(tmp_path / "data", conversations_per_key="true", **UNLIMITED)
    try:
        keys = [create_key(per_key, "shared", "read", name=n) for n in ("one", "two")]
        with per_key.client(keys[0]) as first, per_key.client(keys[1]) as second:
            conversation = start(first)
            assert first.get(f"{API}/conversations/{conversation}").status_code == 200
            assert second.get(f"{API}/conversations/{conversation}").status_code == 404
            assert second.delete(f"{API}/conversations/{conversation}").status_code == 404
            assert second.get(f"{API}/conversations").json()["items"] == []
            assert [c["id"] for c in first.get(f"{API}/conversations").json()["items"]] == [
                conversation
            ]
    finally:
        per_key.stop()
