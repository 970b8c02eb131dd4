"""Real OpenAI clients against a real server's /v1: the `openai` Python SDK, LangChain's
ChatOpenAI and the `openai` npm package, each streaming and not, each getting an answer grounded
in the tenant's documents with its citations, the key sent as they send theirs (Bearer)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from langchain_openai import ChatOpenAI

from tests.chat_corpus import CLOSING, FIRST_QUESTION, FOLLOW_UP, ingest
from tests.conftest import ROOT, Server, create_key

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": FIRST_QUESTION},
    {"role": "assistant", "content": "Call connect() with the path of the database file [1]."},
    {"role": "user", "content": FOLLOW_UP},
]
CLOSING_SENTENCE = "When you are done with a database connection, call its close() method."


@pytest.fixture(scope="module")
def tenant(server: Server) -> Iterator[tuple[str, dict[str, str]]]:
    """A key of a tenant holding only the chat corpus, and its documents' titles by id."""
    key = create_key(server, "openai-clients", "read,write")
    with server.client(key) as http:
        ids = ingest(http)
    yield key, {doc_id: title for title, doc_id in ids.items()}


@pytest.fixture(scope="module")
def sdk(server: Server, tenant: tuple[str, dict[str, str]]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=tenant[0], max_retries=0) as client:
        yield client


def test_the_python_sdk_gets_a_cited_answer(
    sdk: openai.OpenAI, tenant: tuple[str, dict[str, str]]
) -> None:
    completion = sdk.chat.completions.create(model="ragapi", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "ragapi"
    [choice] = completion.choices
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    content = choice.message.content or ""
    assert CLOSING_SENTENCE in content and "[1]" in content
    citations = (choice.message.model_extra or {})["citations"]
    assert tenant[1][citations[0]["document_id"]] == CLOSING
    assert citations[0]["marker"] == 1 and citations[0]["quote"] in content
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert completion.usage.prompt_tokens > completion.usage.completion_tokens
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_the_python_sdk_streams_the_same_answer(
    sdk: openai.OpenAI, tenant: tuple[str, dict[str, str]]
) -> None:
    whole = sdk.chat.completions.create(model="ragapi", messages=MESSAGES)  # type: ignore[arg-type]
    stream = sdk.chat.completions.create(
        model="ragapi",
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "stop"
    citations = (finishing[0].choices[0].delta.model_extra or {})["citations"]
    assert citations == (whole.choices[0].message.model_extra or {})["citations"]
    assert tenant[1][citations[0]["document_id"]] == CLOSING
    # include_usage: a last chunk without choices carries the usage.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens if whole.usage else -1
    )


def test_the_python_sdk_lists_the_models_and_reads_an_unknown_one_as_not_found(
    sdk: openai.OpenAI,
) -> None:
    assert [model.id for model in sdk.models.list()] == ["ragapi", "ragapi-dense", "ragapi-lexical"]
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"


def test_the_python_sdk_reads_a_bad_key_and_a_bad_request_as_its_own_errors(
    server: Server, sdk: openai.OpenAI
) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="rk_nope_nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.models.list()
        assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(
            model="ragapi",
            messages=[{"role": "assistant", "content": "Hello."}],
        )
    assert refused.value.param == "messages/0"


def test_each_profile_answers_from_its_own_retrieval(
    sdk: openai.OpenAI, tenant: tuple[str, dict[str, str]]
) -> None:
    for model in ("ragapi-dense", "ragapi-lexical"):
        completion = sdk.chat.completions.create(model=model, messages=MESSAGES)  # type: ignore[arg-type]
        assert completion.model == model
        citations = (completion.choices[0].message.model_extra or {})["citations"]
        assert tenant[1][citations[0]["document_id"]] == CLOSING, model


def langchain_history() -> list[HumanMessage | AIMessage]:
    return [
        HumanMessage(FIRST_QUESTION),
        AIMessage("Call connect() with the path of the database file [1]."),
        HumanMessage(FOLLOW_UP),
    ]


def test_langchain_chat_openai_gets_the_cited_answer_streaming_and_not(
    server: Server, tenant: tuple[str, dict[str, str]]
) -> None:
    chat = ChatOpenAI(
        model="ragapi",
        base_url=f"{server.url}/v1",
        api_key=tenant[0],  # type: ignore[arg-type]
        max_retries=0,
        stream_usage=True,
    )
    answer = chat.invoke(langchain_history())
    assert CLOSING_SENTENCE in answer.text and "[1]" in answer.text
    assert answer.response_metadata["finish_reason"] == "stop"
    assert answer.usage_metadata and answer.usage_metadata["output_tokens"] > 0

    streamed: AIMessageChunk | None = None
    pieces = 0
    for chunk in chat.stream(langchain_history()):
        streamed = chunk if streamed is None else streamed + chunk
        pieces += 1
    assert streamed is not None and pieces >= 2
    assert streamed.text == answer.text
    assert streamed.usage_metadata == answer.usage_metadata
    assert streamed.response_metadata["finish_reason"] == "stop"


def test_the_npm_openai_package_gets_the_cited_answer_streaming_and_not(
    server: Server, tenant: tuple[str, dict[str, str]]
) -> None:
    node = shutil.which("node")
    assert node, "node is missing: .ci/run installs Node.js"
    project = ROOT / "clients" / "ts"
    assert (project / "node_modules" / "openai").is_dir(), "run `npm ci` in clients/ts first"
    env = {
        **os.environ,
        "RAGAPI_E2E_URL": server.url,
        "RAGAPI_E2E_API_KEY": tenant[0],
        "RAGAPI_CHAT_MESSAGES": json.dumps(MESSAGES),
    }
    result = subprocess.run(
        [node, "openai-chat.mjs"], cwd=project, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    received = json.loads(result.stdout)

    completion = received["completion"]
    message = completion["choices"][0]["message"]
    assert CLOSING_SENTENCE in message["content"]
    assert tenant[1][message["citations"][0]["document_id"]] == CLOSING
    assert completion["choices"][0]["finish_reason"] == "stop"
    assert completion["usage"]["total_tokens"] > 0

    streamed = received["streamed"]
    assert streamed["text"] == message["content"]
    assert streamed["citations"] == message["citations"]
    assert streamed["finish_reason"] == "stop"
    assert streamed["usage"] == completion["usage"]
    assert streamed["chunks"] >= 4  # role, text, finish with citations, usage

    assert received["unknownModel"]["status"] == 404
    assert received["unknownModel"]["code"] == "model_not_found"
    assert received["models"] == ["ragapi", "ragapi-dense", "ragapi-lexical"]


def test_the_key_works_as_bearer_and_as_x_api_key_on_v1(
    server: Server, tenant: tuple[str, dict[str, str]]
) -> None:
    for headers in ({"Authorization": f"Bearer {tenant[0]}"}, {"X-API-Key": tenant[0]}):
        assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == 200
