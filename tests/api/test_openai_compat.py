"""/v1/chat/completions and /v1/models on the wire, through a real server: the bytes of a
stream, OpenAI's error bodies, and the same keys, scopes, budgets and metrics as /api/v1."""

from __future__ import annotations

import json
import re

import httpx

from tests.conftest import Server, create_key

QUESTION = [{"role": "user", "content": "How often should a sourdough starter be fed?"}]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_stream_is_data_lines_ending_in_done(server: Server) -> None:
    body = {"model": "ragapi", "messages": QUESTION, "stream": True}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=bearer(server.api_key)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-1]]
    # Without stream_options.include_usage no chunk says anything of usage.
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "stop"
    ]
    assert "citations" in chunks[-1]["choices"][0]["delta"]


def test_content_given_as_text_parts_is_read_as_its_text(server: Server) -> None:
    parts = [
        {"type": "text", "text": "How often should "},
        {"type": "text", "text": "a starter be fed?"},
    ]
    answer = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "ragapi", "messages": [{"role": "user", "content": parts}]},
        headers=bearer(server.api_key),
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    whole = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={
            "model": "ragapi",
            "messages": [{"role": "user", "content": "".join(p["text"] for p in parts)}],
        },
        headers=bearer(server.api_key),
        timeout=60,
    )
    assert answer.json()["choices"] == whole.json()["choices"]


def openai_error(response: httpx.Response) -> dict[str, str | None]:
    assert response.headers["content-type"] == "application/json"
    error: dict[str, str | None] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_errors_under_v1_are_openai_error_bodies(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    missing = httpx.post(url, json={"model": "ragapi", "messages": QUESTION})
    assert missing.status_code == 401
    assert openai_error(missing)["type"] == "authentication_error"
    assert "Bearer" in missing.headers["www-authenticate"]

    # An Authorization header is the credential presented: wrong or not Bearer, it is refused
    # even beside a valid X-API-Key.
    for authorization in ("Bearer rk_wrong_key", f"Basic {server.api_key}"):
        headers = {"Authorization": authorization, "X-API-Key": server.api_key}
        refused = httpx.get(f"{server.url}/v1/models", headers=headers)
        assert refused.status_code == 401
        assert openai_error(refused)["code"] == "invalid_api_key"

    invalid = httpx.post(
        url, json={"model": "ragapi", "messages": []}, headers=bearer(server.api_key)
    )
    assert invalid.status_code == 400
    error = openai_error(invalid)
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"

    two = httpx.post(
        url, json={"model": "ragapi", "messages": QUESTION, "n": 2}, headers=bearer(server.api_key)
    )
    assert two.status_code == 400 and openai_error(two)["param"] == "n"

    unknown = httpx.get(f"{server.url}/v1/embeddings", headers=bearer(server.api_key))
    assert unknown.status_code == 404
    assert openai_error(unknown)["type"] == "invalid_request_error"


def test_scopes_apply_to_v1_as_to_the_rest(server: Server) -> None:
    write_only = create_key(server, "default", "write", name="writer")
    refused = httpx.get(f"{server.url}/v1/models", headers=bearer(write_only))
    assert refused.status_code == 403
    assert openai_error(refused)["type"] == "permission_error"


def test_chat_completions_spend_the_keys_query_budget(server: Server) -> None:
    made = httpx.post(
        f"{server.url}/api/v1/keys",
        json={"name": "two queries", "scopes": ["read"], "rate_limits": {"query": "2/minute"}},
        headers={"X-API-Key": server.api_key},
    )
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    # One question through /api/v1/query, one through /v1: the budget is the same.
    asked = httpx.post(
        f"{server.url}/api/v1/query",
        json={"question": "How often is the starter fed?"},
        headers={"X-API-Key": key},
        timeout=60,
    )
    assert asked.status_code == 200
    url = f"{server.url}/v1/chat/completions"
    body = {"model": "ragapi", "messages": QUESTION}
    second = httpx.post(url, json=body, headers=bearer(key), timeout=60)
    assert second.status_code == 200
    assert re.match(r'"query";r=0;t=\d+', second.headers["ratelimit"])
    third = httpx.post(url, json=body, headers=bearer(key), timeout=60)
    assert third.status_code == 429
    assert int(third.headers["retry-after"]) > 0
    assert openai_error(third)["type"] == "rate_limit_error"


def test_v1_operations_are_in_the_metrics(server: Server) -> None:
    httpx.get(f"{server.url}/v1/models", headers=bearer(server.api_key))
    httpx.get(f"{server.url}/v1/models")
    metrics = httpx.get(f"{server.url}/api/v1/metrics", headers={"X-API-Key": server.api_key}).text
    assert re.search(r'ragapi_requests_total\{operation="listModels",status="200"\} [1-9]', metrics)
    assert re.search(r'ragapi_unauthorized_total\{operation="listModels"\} [1-9]', metrics)
