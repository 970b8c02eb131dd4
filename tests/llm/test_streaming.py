"""Streamed answers from real models: a llama.cpp OpenAI-compatible server on loopback (the
OpenAI-compatible provider) and the packaged GGUF in-process (the llamacpp provider), on the
indexed corpus of tests/rag/test_streaming.py."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from impl.rag.answers import llamacpp_answer_provider
from impl.rag.types import AnswerEvent, RetrievalEvent, TokenEvent
from tests.documents import CORPUS
from tests.llm.server import MODEL_ALIAS, start_llm_server, stop
from tests.rag.conftest import ServiceFactory, make_settings
from tests.rag.test_streaming import (
    LIST_QUESTION,
    TENANT,
    assert_cites_retrieved,
    corpus_dir,
    open_service,
    split,
)

__all__ = ["corpus_dir", "open_service"]  # fixtures, imported so pytest finds them here


@pytest.fixture(scope="module")
def llm_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """(pid, base URL) of a llama.cpp server of our own: the test watches its CPU time."""
    process, base_url = start_llm_server(tmp_path_factory.mktemp("llm") / "llama-server.log")
    try:
        yield process.pid, base_url
    finally:
        stop(process)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_openai_stream_is_real_and_closing_it_stops_the_model(
    open_service: ServiceFactory, llm_process: tuple[int, str]
) -> None:
    pid, base_url = llm_process
    service = open_service(
        answer_provider="openai",
        llm_base_url=base_url,
        llm_model=MODEL_ALIAS,
        max_answer_tokens=160,
    )

    # Run to its end, timing each event and the server's CPU while it generates.
    started = time.perf_counter()
    events: list[AnswerEvent] = []
    arrivals: list[float] = []
    for event in service.stream_answer(TENANT, LIST_QUESTION, top_k=1):
        events.append(event)
        arrivals.append(time.perf_counter() - started)
        if len(events) == 2:
            cpu_at_first_token = cpu_seconds(pid)
    generating_cpu_s = cpu_seconds(pid) - cpu_at_first_token
    retrieval, tokens, done = split(events)
    streaming_s = arrivals[-1] - arrivals[1]
    print(
        f"\nllama.cpp server: first token after {arrivals[1]:.2f} s, {len(tokens)} deltas in "
        f"{streaming_s:.2f} s more: {done.answer.answer[:60]!r}..."
    )
    assert retrieval.hits == service.search(TENANT, LIST_QUESTION, top_k=1)
    assert "".join(token.text for token in tokens) == done.answer.answer
    assert done.answer.provider == "openai" and done.answer.found
    assert_cites_retrieved(done, retrieval)
    # Streamed as the model wrote, not sent in one burst at the end.
    assert len(tokens) > 20 and streaming_s > 0.1

    # The same request, closed after its first token.
    stream = service.stream_answer(TENANT, LIST_QUESTION, top_k=1)
    assert isinstance(next(stream), RetrievalEvent)
    assert isinstance(next(stream), TokenEvent)
    closing = time.perf_counter()
    stream.close()
    closed_s = time.perf_counter() - closing
    with pytest.raises(StopIteration):
        next(stream)
    # The server notices the closed connection at its next token and stops. Left running, it
    # would go on computing for about `streaming_s`, through the window watched here, at the
    # CPU rate it had above; stopped, it idles.
    window_s = min(1.0, streaming_s / 2)
    time.sleep(0.2)
    before = cpu_seconds(pid)
    time.sleep(window_s)
    busy_s = cpu_seconds(pid) - before
    generating_s = generating_cpu_s / streaming_s * window_s
    print(
        f"closed in {closed_s * 1000:.1f} ms; then the server used {busy_s:.2f} s CPU in "
        f"{window_s:.2f} s, against {generating_s:.2f} s while generating"
    )
    assert closed_s < 0.5
    assert busy_s < 0.25 * generating_s


@pytest.mark.timeout(120)
def test_llamacpp_streams_and_a_closed_stream_frees_the_model(open_service: ServiceFactory) -> None:
    # A small window and short answers keep this quick on a CPU.
    provider = llamacpp_answer_provider(
        make_settings(Path("unused"), max_answer_tokens=48), context_tokens=768
    )
    service = open_service()
    hits = service.search(TENANT, CORPUS["rust"].question, top_k=2)

    deltas = []
    stream = provider.stream(CORPUS["rust"].question, hits)
    try:
        while True:
            deltas.append(next(stream))
    except StopIteration as end:
        text, citations = end.value
    assert len(deltas) > 1 and "".join(deltas) == text
    assert {c.chunk_id for c in citations} <= {hit.chunk.id for hit in hits}

    # Closed after one delta, the stream gives the model back: the next answer does not wait
    # for a lock that a half-read stream still holds.
    stream = provider.stream(CORPUS["rust"].question, hits)
    next(stream)
    stream.close()
    assert provider.generate(CORPUS["rust"].question, hits)[0].strip()
