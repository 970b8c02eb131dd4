"""Parser processes: each upload is read in a child process that cannot outlive its time limit
or take more than its memory limit, and only parse_workers of them run at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from impl.errors import DocumentTooLarge, ServiceUnavailable, UnreadableDocument
from impl.rag.loaders import DOCX, HTML, ParseLimits, extract_text
from impl.rag.parsing import ParserProcesses
from tests.documents import CORPUS, make_docx, make_lying_docx
from tests.rag.conftest import make_settings

MB = 1024 * 1024
# Every level of lxml's and BeautifulSoup's trees, inside single library calls.
NESTED_HTML = b"<html><body>" + b"<div>" * 10**6 + b"x" + b"</div>" * 10**6 + b"</body></html>"


def test_a_document_comes_back_as_the_loaders_read_it(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    content = make_docx(CORPUS["saturn"].paragraphs)
    media_type, extracted = ParserProcesses(settings).parse(content, "saturn.docx", None)
    assert media_type == DOCX
    assert extracted == extract_text(content, DOCX, ParseLimits.from_settings(settings))


def test_a_refusal_in_the_parser_reaches_the_caller(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path))
    with pytest.raises(UnreadableDocument, match="damaged"):
        parsers.parse(make_lying_docx(64 * MB), "memo.docx", None)


def test_a_parse_is_stopped_at_its_time_limit_inside_a_library_call(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path, max_parse_seconds=1.0))
    parsers.parse(b"warm up the forkserver", None, None)
    started = time.monotonic()
    with pytest.raises(DocumentTooLarge, match="longer than 1 seconds"):
        parsers.parse(NESTED_HTML, "nested.html", None)
    assert 0.9 <= time.monotonic() - started <= 2.0


@pytest.mark.slow
def test_a_parse_past_its_memory_limit_is_refused(tmp_path: Path) -> None:
    parsers = ParserProcesses(make_settings(tmp_path, max_parse_memory_bytes=256 * MB))
    two_million_paragraphs = b"<html><body>" + b"<p>x</p>" * 2_000_000 + b"</body></html>"
    with pytest.raises(DocumentTooLarge, match="more than 256 MB of memory"):
        parsers.parse(two_million_paragraphs, "many.html", None)


def test_parses_beyond_parse_workers_wait_and_then_are_refused(tmp_path: Path) -> None:
    parsers = ParserProcesses(
        make_settings(tmp_path, parse_workers=1, parse_wait_seconds=0.5, max_parse_seconds=3.0)
    )
    parsers.parse(b"warm up the forkserver", None, None)
    outcomes: list[BaseException] = []

    def parse_slowly() -> None:
        try:
            parsers.parse(NESTED_HTML, None, HTML)
        except DocumentTooLarge as exc:
            outcomes.append(exc)

    busy = threading.Thread(target=parse_slowly)
    busy.start()
    time.sleep(0.3)  # the one parser is taken
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="busy"):
        parsers.parse(b"a small text", None, None)
    assert 0.4 <= time.monotonic() - started <= 1.0
    busy.join()
    assert len(outcomes) == 1
    # Free again once the slow parse was stopped.
    assert parsers.parse(b"a small text", None, None)[1].text == "a small text"
