"""Streamed answers (RagService.stream_answer) with real Chroma and the real packaged embedding
model: event order, deltas that add up to the final answer, citations, the nothing-found path
and errors. The same through a real OpenAI-compatible server and the packaged GGUF model, and
that closing the stream early stops the model: tests/llm/test_streaming.py."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import RunnableLambda

from impl.errors import InvalidInput, UpstreamError
from impl.rag.answers import (
    ChatAnswerProvider,
    ExtractiveAnswerProvider,
    map_citations,
)
from impl.rag.embeddings import EmbeddingModel
from impl.rag.service import NO_ANSWER, RagService
from impl.rag.types import (
    AnswerEvent,
    Chunk,
    DoneEvent,
    RetrievalEvent,
    SearchHit,
    TokenEvent,
)
from impl.settings import Settings
from tests.conftest import free_port
from tests.documents import CORPUS
from tests.rag.conftest import ServiceFactory, ingest, make_settings, text_item

TENANT = "acme"
# Forty short lines: asked to list them, SmolLM2 writes for well over a hundred tokens, so
# closing its stream after the first token leaves much of the answer uncomputed.
INVENTORY = "Warehouse inventory. " + " ".join(
    f"Crate {i} holds {i * 7 % 13} widgets of colour {('red', 'blue', 'green')[i % 3]}."
    for i in range(40)
)
LIST_QUESTION = "List every crate in the warehouse inventory and how many widgets it holds."


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, embeddings: EmbeddingModel) -> Path:
    """A data dir with the CORPUS documents and the inventory indexed, for services opened on
    it one at a time."""
    data_dir = tmp_path_factory.mktemp("streaming") / "data"
    service = RagService(make_settings(data_dir), embeddings)
    service.start()
    try:
        items = [text_item("\n\n".join(doc.paragraphs), title=doc.title) for doc in CORPUS.values()]
        ingest(service, TENANT, [*items, text_item(INVENTORY, title="Warehouse inventory")])
    finally:
        service.close()
    return data_dir


@pytest.fixture
def open_service(corpus_dir: Path, embeddings: EmbeddingModel) -> Iterator[ServiceFactory]:
    """Opens a service on the indexed corpus with the given settings; closed after the test."""
    services: list[RagService] = []

    def build(**overrides: Any) -> RagService:
        service = RagService(make_settings(corpus_dir, **overrides), embeddings)
        services.append(service)
        return service

    yield build
    for service in services:
        service.close()


def split(events: list[AnswerEvent]) -> tuple[RetrievalEvent, list[TokenEvent], DoneEvent]:
    """The events, checked for order: one retrieval first, tokens, one done last."""
    first, *tokens, last = events
    assert isinstance(first, RetrievalEvent)
    assert isinstance(last, DoneEvent)
    assert all(isinstance(token, TokenEvent) and token.text for token in tokens), tokens
    return first, [t for t in tokens if isinstance(t, TokenEvent)], last


def assert_cites_retrieved(done: DoneEvent, retrieval: RetrievalEvent) -> None:
    by_id = {hit.chunk.id: hit for hit in retrieval.hits}
    used = [int(n) for n in re.findall(r"\[(\d+)\]", done.answer.answer)]
    assert list(dict.fromkeys(used)) == [c.marker for c in done.answer.citations]
    for citation in done.answer.citations:
        assert citation.quote in by_id[citation.chunk_id].chunk.text


# --------------------------------------------------------------------------------------------
# extractive
# --------------------------------------------------------------------------------------------


def test_extractive_stream_sends_retrieval_then_quotes_then_the_answer(
    open_service: ServiceFactory,
) -> None:
    service = open_service()
    question = CORPUS["saturn"].question
    started = time.perf_counter()
    stream = service.stream_answer(TENANT, question, top_k=3)
    retrieval = next(stream)
    first_token = next(stream)
    first_token_s = time.perf_counter() - started
    retrieval, tokens, done = split([retrieval, first_token, *stream])
    print(f"\nextractive: first token after {first_token_s * 1000:.1f} ms (retrieval included)")

    # The answer draws on exactly what a search for the question finds.
    assert retrieval.hits == service.search(TENANT, question, top_k=3)
    assert "".join(token.text for token in tokens) == done.answer.answer
    # One delta per quote, each with its marker.
    assert len(tokens) == len(done.answer.citations)
    for token, citation in zip(tokens, done.answer.citations, strict=True):
        assert token.text.endswith(f"[{citation.marker}]")
    assert CORPUS["saturn"].answer in done.answer.answer
    assert_cites_retrieved(done, retrieval)
    timings = done.answer.timings
    assert 0 < timings.retrieval_ms <= timings.total_ms
    assert timings.generation_ms <= timings.total_ms

    # answer() is the same stream, run to its end.
    answer = service.answer(TENANT, question, top_k=3)
    assert (answer.answer, answer.citations, answer.found, answer.provider) == (
        done.answer.answer,
        done.answer.citations,
        True,
        "extractive",
    )


def test_nothing_found_streams_the_same_text_as_answer(open_service: ServiceFactory) -> None:
    service = open_service()
    question = "What is the airspeed of an unladen swallow?"
    events = list(service.stream_answer(TENANT, question, top_k=3, min_score=0.95))
    retrieval, tokens, done = split(events)
    assert retrieval.hits == []
    assert [token.text for token in tokens] == [NO_ANSWER]
    assert (done.answer.answer, done.answer.citations, done.answer.found) == (NO_ANSWER, [], False)
    assert service.answer(TENANT, question, top_k=3, min_score=0.95).answer == NO_ANSWER


def test_bad_requests_fail_on_the_first_next_before_any_event(open_service: ServiceFactory) -> None:
    service = open_service()
    stream = service.stream_answer(TENANT, "  ", top_k=3)  # no work is done before next()
    with pytest.raises(InvalidInput, match="empty"):
        next(stream)
    with pytest.raises(InvalidInput, match="top_k"):
        next(service.stream_answer(TENANT, "When?", top_k=0))


# --------------------------------------------------------------------------------------------
# markers rewritten while the answer streams
# --------------------------------------------------------------------------------------------


def fake_model(pieces: list[str]) -> RunnableLambda[PromptValue, AIMessageChunk]:
    """A chat model that streams these pieces."""

    def stream(_: PromptValue) -> Iterator[AIMessageChunk]:
        for piece in pieces:
            yield AIMessageChunk(content=piece)

    return RunnableLambda(stream)


def make_hits(count: int) -> list[SearchHit]:
    texts = [
        "At sea level water boils at 100 degrees Celsius.",
        "The Eiffel Tower was built between 1887 and 1889.",
        "Python was first released in 1991.",
    ]
    return [
        SearchHit(Chunk(f"c{n}", f"d{n}", 0, text, None, 0, len(text)), f"Doc {n}", 0.5)
        for n, text in enumerate(texts[:count])
    ]


MODEL_OUTPUTS = [
    # Renumbered, invented ones dropped with the spaces before them, lists and ranges expanded.
    " Water boils at 100 degrees [2]. The tower was built in 1887 [1][9]. Python came in 1991 "
    "[3, 7] and [Source 2] again; nothing backs this [12]. Ranges [1-3] and [2 and 1].  ",
    # A year in brackets stays text; a bracket that never closes stays text.
    "Python 3.0 came in [2008], see [note] and [1, 2",
    # No valid marker: the best-matching hit is attached as [1] at the end.
    "\n\nWater boils at 100 degrees Celsius. [7]\n",
    # Says it does not know: no citation, the invented marker is gone.
    "[5] I don't know based on the provided sources. [4]",
    # A marker split over lines, and brackets next to each other.
    "Tower [\n1,\n 3 ] and water [[2]] [ sources 3 ]",
]


@pytest.mark.parametrize("output", MODEL_OUTPUTS)
def test_streamed_deltas_are_the_final_text_however_the_model_splits_it(output: str) -> None:
    hits = make_hits(3)
    expected = map_citations(output, "q", hits)
    splits = [list(output)] + [[output[:cut], output[cut:]] for cut in range(1, len(output))]
    for pieces in splits:
        stream = ChatAnswerProvider("test", fake_model(pieces)).stream("q", hits)
        deltas = []
        try:
            while True:
                deltas.append(next(stream))
        except StopIteration as end:
            assert end.value == expected
        assert "".join(deltas) == expected[0], pieces
        assert all(deltas)
    # Sent as it comes: character by character, the text arrives in many deltas.
    deltas = list(ChatAnswerProvider("test", fake_model(list(output))).stream("q", hits))
    assert len(deltas) > len(output) // 4


def test_extractive_generate_is_its_stream_drained() -> None:
    hits = make_hits(3)
    provider = ExtractiveAnswerProvider(Settings().answer_min_score)
    deltas = list(provider.stream("When was Python released?", hits))
    text, citations = provider.generate("When was Python released?", hits)
    assert "".join(deltas) == text and "1991" in text and citations


# --------------------------------------------------------------------------------------------
# an OpenAI-compatible endpoint (a real server: tests/llm/test_streaming.py)
# --------------------------------------------------------------------------------------------


def test_unreachable_endpoint_fails_after_the_retrieval_event(open_service: ServiceFactory) -> None:
    service = open_service(
        answer_provider="openai",
        llm_base_url=f"http://127.0.0.1:{free_port()}/v1",
        llm_timeout_seconds=5,
    )
    stream = service.stream_answer(TENANT, CORPUS["saturn"].question, top_k=3)
    assert isinstance(next(stream), RetrievalEvent)
    with pytest.raises(UpstreamError) as caught:
        next(stream)
    assert caught.value.detail == "the language model endpoint failed: it could not be reached"
