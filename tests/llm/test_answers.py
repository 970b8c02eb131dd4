"""Answer providers with real models: the OpenAI-compatible provider against a real llama.cpp
server on loopback, and the llamacpp provider with the packaged GGUF in-process. SmolLM2-135M is
tiny, so these check structure and citation validity, not the wisdom of the answer."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from impl.errors import ConfigurationError, UpstreamError
from impl.rag.answers import (
    build_answer_provider,
    default_llamacpp_model_path,
    llamacpp_answer_provider,
    says_it_does_not_know,
)
from impl.rag.embeddings import EmbeddingModel
from tests.rag.test_answers import (
    ALL_CHUNKS,
    CHUNKS,
    QUESTIONS,
    assert_valid_citations,
    embeddings,
    hit,
    ranked,
    settings,
)

__all__ = ["embeddings"]  # a fixture, imported so pytest finds it here


def test_openai_provider_answers_through_a_real_server(
    embeddings: EmbeddingModel, llm_server: str
) -> None:
    provider = build_answer_provider(
        settings(
            answer_provider="openai",
            llm_base_url=llm_server,
            llm_model="smollm2",
            max_answer_tokens=48,
        ),
        embeddings,
    )
    for question, _, document in QUESTIONS[:2]:
        hits = ranked(CHUNKS[document])[:3]
        started = time.perf_counter()
        answer, citations = provider.generate(question, hits)
        elapsed = time.perf_counter() - started
        print(f"\nopenai provider via llama.cpp server: {elapsed:.2f} s: {answer!r}")
        assert answer.strip()
        assert_valid_citations(answer, citations, hits)
        # Unless the model says it does not know, a retrieved chunk backs the answer.
        assert citations or says_it_does_not_know(answer)


def test_openai_provider_error_status_is_upstream_error(
    embeddings: EmbeddingModel, llm_server: str
) -> None:
    provider = build_answer_provider(
        settings(answer_provider="openai", llm_base_url=llm_server.removesuffix("/v1") + "/nope"),
        embeddings,
    )
    with pytest.raises(UpstreamError) as caught:
        provider.generate("When does water boil?", ranked(CHUNKS["water"]))
    assert caught.value.detail == "the language model endpoint failed: it answered HTTP 404"


def test_llamacpp_provider_answers_with_the_packaged_model(embeddings: EmbeddingModel) -> None:
    assert default_llamacpp_model_path().is_file()
    assert build_answer_provider(settings(answer_provider="llamacpp"), embeddings).name == (
        "llamacpp"
    )
    # A small window keeps this test quick on a CPU, and makes the second call overflow it.
    provider = llamacpp_answer_provider(settings(max_answer_tokens=48), context_tokens=768)
    hits = ranked(CHUNKS["eiffel"])[:3]
    started = time.perf_counter()
    answer, citations = provider.generate("How tall is the Eiffel Tower?", hits)
    print(f"\nllamacpp provider: {time.perf_counter() - started:.2f} s: {answer!r}")
    assert answer.strip()
    assert_valid_citations(answer, citations, hits)
    assert citations or says_it_does_not_know(answer)

    # 40 hits of about 50 tokens overflow the window: the lowest-ranked are left out of the
    # prompt, so no citation can point at them.
    many = [
        hit(replace(chunk, id=f"{chunk.id}-copy{n}"), 0.6 - 0.01 * n)
        for n in range(4)
        for chunk in ALL_CHUNKS
    ]
    answer, citations = provider.generate("When was Python first released?", many)
    assert answer.strip()
    assert_valid_citations(answer, citations, many)
    assert {c.chunk_id for c in citations} <= {h.chunk.id for h in many[:14]}


def test_llamacpp_provider_with_a_bad_model_is_a_configuration_error(
    embeddings: EmbeddingModel, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match="llamacpp_model_path"):
        build_answer_provider(
            settings(answer_provider="llamacpp", llamacpp_model_path=tmp_path / "none.gguf"),
            embeddings,
        )
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model" * 100)
    with pytest.raises(ConfigurationError, match="could not be loaded"):
        build_answer_provider(
            settings(answer_provider="llamacpp", llamacpp_model_path=garbage), embeddings
        )


def test_openai_provider_timeout_is_upstream_error(
    embeddings: EmbeddingModel, llm_server: str
) -> None:
    # Last in the module: the server still works through the abandoned requests after this.
    provider = build_answer_provider(
        settings(
            answer_provider="openai",
            llm_base_url=llm_server,
            llm_timeout_seconds=0.05,
            max_answer_tokens=16,
        ),
        embeddings,
    )
    with pytest.raises(UpstreamError) as caught:
        provider.generate("When does water boil?", ranked(CHUNKS["water"])[:1])
    assert caught.value.detail == "the language model endpoint failed: it did not answer in time"
