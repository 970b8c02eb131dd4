"""Parser processes: a request's uploads are read in a child process in which no document can
outlive its time limit or take more than its memory limit, and only parse_workers of them run
at once."""

from __future__ import annotations

import os
import signal
import threading
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest

from impl.errors import DocumentTooLarge, RagapiError, ServiceUnavailable, UnreadableDocument
from impl.rag.loaders import DOCX, HTML, ExtractedText, ParseLimits, extract_text
from impl.rag.parsing import ParserProcesses
from impl.rag.types import IngestItem
from tests.documents import CORPUS, make_docx, make_lying_docx
from tests.rag.conftest import make_settings

MB = 1024 * 1024
# Every level of lxml's and BeautifulSoup's trees, inside single library calls.
NESTED_HTML = b"<html><body>" + b"<div>" * 10**6 + b"x" + b"</div>" * 10**6 + b"</body></html>"


def item(content: bytes, filename: str | None = None, declared: str | None = None) -> IngestItem:
    return IngestItem(
        content=content, filename=filename, title=None, metadata={}, declared_media_type=declared
    )


def parse_one(
    parsers: ParserProcesses, content: bytes, filename: str | None, declared: str | None
) -> tuple[str, ExtractedText]:
    """One document's media type and text; raises what refused it."""
    (outcome,) = parsers.parse([item(content, filename, declared)])
    if isinstance(outcome, RagapiError):
        raise outcome
    return outcome


def test_a_document_comes_back_as_the_loaders_read_it(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    content = make_docx(CORPUS["saturn"].paragraphs)
    media_type, extracted = parse_one(ParserProcesses(settings), content, "saturn.docx", None)
    assert media_type == DOCX
    assert extracted == extract_text(content, DOCX, ParseLimits.from_settings(settings))


def test_a_refusal_in_the_parser_reaches_the_caller(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path))
    with pytest.raises(UnreadableDocument, match="damaged"):
        parse_one(parsers, make_lying_docx(64 * MB), "memo.docx", None)


def test_a_parse_is_stopped_at_its_time_limit_inside_a_library_call(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path, max_parse_seconds=1.0))
    parse_one(parsers, b"warm up the forkserver", None, None)
    started = time.monotonic()
    with pytest.raises(DocumentTooLarge, match="longer than 1 seconds"):
        parse_one(parsers, NESTED_HTML, "nested.html", None)
    assert 0.9 <= time.monotonic() - started <= 2.0


@pytest.mark.slow
def test_a_parse_past_its_memory_limit_is_refused(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path, max_parse_memory_bytes=256 * MB))
    two_million_paragraphs = b"<html><body>" + b"<p>x</p>" * 2_000_000 + b"</body></html>"
    with pytest.raises(DocumentTooLarge, match="more than 256 MB of memory"):
        parse_one(parsers, two_million_paragraphs, "many.html", None)


def test_parses_beyond_parse_workers_wait_and_then_are_refused(tmp_path: Path) -> None:
    parsers = ParserProcesses(
        make_settings(tmp_path, parse_workers=1, parse_wait_seconds=0.5, max_parse_seconds=3.0)
    )
    parse_one(parsers, b"warm up the forkserver", None, None)
    outcomes: list[BaseException] = []

    def parse_slowly() -> None:
        try:
            parse_one(parsers, NESTED_HTML, None, HTML)
        except DocumentTooLarge as exc:
            outcomes.append(exc)

    busy = threading.Thread(target=parse_slowly)
    busy.start()
    time.sleep(0.3)  # the one parser is taken
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="busy"):
        parse_one(parsers, b"a small text", None, None)
    assert 0.4 <= time.monotonic() - started <= 1.0
    busy.join()
    assert len(outcomes) == 1
    # Free again once the slow parse was stopped.
    assert parse_one(parsers, b"a small text", None, None)[1].text == "a small text"


def test_a_requests_documents_come_back_in_order_up_to_the_first_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    memo = make_docx(CORPUS["saturn"].paragraphs)
    outcomes = ParserProcesses(settings).parse(
        [
            item(b"the first text", "first.txt"),
            item(memo, "saturn.docx"),
            item(make_lying_docx(64 * MB), "memo.docx"),
            item(b"never read", "last.txt"),
        ]
    )
    assert len(outcomes) == 3
    first, second, refused = outcomes
    assert not isinstance(first, RagapiError) and first[1].text == "the first text"
    assert second == (DOCX, extract_text(memo, DOCX, ParseLimits.from_settings(settings)))
    assert isinstance(refused, UnreadableDocument) and "damaged" in refused.detail


def test_each_document_of_a_request_has_its_own_time_limit(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path, max_parse_seconds=1.0))
    parse_one(parsers, b"warm up the forkserver", None, None)
    started = time.monotonic()
    outcomes = parsers.parse([item(b"a small text"), item(NESTED_HTML, "nested.html")])
    assert 0.9 <= time.monotonic() - started <= 2.0
    assert outcomes[0] == ("text/plain", ExtractedText(text="a small text", page_starts=None))
    assert isinstance(outcomes[1], DocumentTooLarge)
    # The next request gets a parser of its own.
    assert parse_one(parsers, b"a small text", None, None)[1].text == "a small text"


@pytest.mark.slow
def test_a_document_past_the_memory_limit_after_others_is_refused_alike(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path, max_parse_memory_bytes=256 * MB))
    two_million_paragraphs = b"<html><body>" + b"<p>x</p>" * 2_000_000 + b"</body></html>"
    outcomes = parsers.parse(
        [item(b"a small text"), item(two_million_paragraphs, "many.html"), item(b"more")]
    )
    assert len(outcomes) == 2 and not isinstance(outcomes[0], RagapiError)
    assert isinstance(outcomes[1], DocumentTooLarge)
    assert "more than 256 MB of memory" in outcomes[1].detail


def parser_children() -> list[int]:
    """The pids of the parser processes alive now (the forkserver's children)."""
    server = forkserver._forkserver._forkserver_pid
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == server:
            children.append(int(stat.parent.name))
    return children


def test_a_parser_that_dies_fails_its_document_and_not_the_caller(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path, max_parse_seconds=30.0))
    parse_one(parsers, b"warm up the forkserver", None, None)
    outcomes: list[object] = []
    parsing = threading.Thread(
        target=lambda: outcomes.extend(parsers.parse([item(NESTED_HTML, "nested.html")]))
    )
    parsing.start()
    deadline = time.monotonic() + 10
    while not (children := parser_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in children:  # whether it has read the document yet or not
        os.kill(pid, signal.SIGKILL)
    parsing.join(timeout=10)
    assert not parsing.is_alive()
    assert len(outcomes) == 1 and isinstance(outcomes[0], UnreadableDocument)
    assert "its parser failed" in outcomes[0].detail
    # The next request gets a parser of its own.
    assert parse_one(parsers, b"a small text", None, None)[1].text == "a small text"
