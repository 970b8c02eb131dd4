"""Chunking with the real MiniLM token counts, on the text of every file type."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from functools import partial

import pytest

from impl.errors import ConfigurationError
from impl.rag.chunking import Chunker, ChunkSpan
from impl.rag.embeddings import count_tokens, load_tokenizer
from impl.rag.loaders import DOCX, HTML, MARKDOWN, PDF, TEXT, ExtractedText, ParseLimits
from impl.rag.loaders import extract_text as extract
from tests.documents import CORPUS, make_docx, make_html, make_markdown, make_pdf, make_text

LIMITS = ParseLimits(2000, 100 * 1024 * 1024, 5_000_000, 60.0)
PARAGRAPHS = [p for document in CORPUS.values() for p in document.paragraphs]
BUILDERS: dict[str, Callable[[list[str]], bytes]] = {
    PDF: make_pdf,  # one paragraph per page
    DOCX: make_docx,
    HTML: lambda paragraphs: make_html("Five topics", paragraphs),
    MARKDOWN: lambda paragraphs: make_markdown("Five topics", paragraphs),
    TEXT: make_text,
}


@pytest.fixture(scope="module")
def tokens() -> Callable[[str], int]:
    return partial(count_tokens, load_tokenizer())


def check_spans(
    extracted: ExtractedText, spans: list[ChunkSpan], tokens: Callable[[str], int], limit: int
) -> None:
    """What every user of chunks relies on: each chunk is the text found at its offsets, on its
    page, within the token budget, in order, and together they leave no word out."""
    text = extracted.text
    assert [span.index for span in spans] == list(range(len(spans)))
    covered = bytearray(len(text))
    previous_start = -1
    for span in spans:
        assert text[span.start_char : span.end_char] == span.text
        assert span.text == span.text.strip() and span.text
        assert span.start_char > previous_start
        assert span.page == extracted.page_at(span.start_char)
        assert tokens(span.text) <= limit
        covered[span.start_char : span.end_char] = b"\x01" * len(span.text)
        previous_start = span.start_char
    missed = [ch for ch, hit in zip(text, covered, strict=True) if not hit and not ch.isspace()]
    assert missed == []


@pytest.mark.parametrize("media_type", list(BUILDERS))
def test_chunks_of_every_file_type_keep_the_invariants(
    media_type: str, tokens: Callable[[str], int]
) -> None:
    extracted = extract(BUILDERS[media_type](PARAGRAPHS), media_type, LIMITS)
    spans = Chunker(tokens, chunk_tokens=40, overlap_tokens=8).split(extracted)
    assert len(spans) > len(PARAGRAPHS) // 2
    check_spans(extracted, spans, tokens, 40)


def test_pdf_chunks_carry_their_page(tokens: Callable[[str], int]) -> None:
    pages = [" ".join(document.paragraphs) for document in CORPUS.values()]
    extracted = extract(make_pdf(pages), PDF, LIMITS)
    spans = Chunker(tokens, chunk_tokens=60, overlap_tokens=0).split(extracted)
    check_spans(extracted, spans, tokens, 60)
    assert {span.page for span in spans} == {1, 2, 3, 4, 5}
    titan = next(span for span in spans if "Titan" in span.text)
    assert titan.page == 3
    assert [span.page for span in spans] == sorted(span.page or 0 for span in spans)


def test_unpaged_chunks_have_no_page(tokens: Callable[[str], int]) -> None:
    spans = Chunker(tokens, 40, 8).split(ExtractedText("\n\n".join(PARAGRAPHS), None))
    assert spans and all(span.page is None for span in spans)


def test_a_short_text_is_one_chunk(tokens: Callable[[str], int]) -> None:
    extracted = ExtractedText("  Titan has lakes of methane.  \n", None)
    assert Chunker(tokens, 200, 30).split(extracted) == [
        ChunkSpan(0, "Titan has lakes of methane.", 2, 29, None)
    ]


def test_neighbouring_chunks_overlap_only_when_asked(tokens: Callable[[str], int]) -> None:
    # One long paragraph, so the split falls inside it and overlap can repeat sentences.
    extracted = ExtractedText(" ".join(PARAGRAPHS), None)
    overlapping = Chunker(tokens, 50, 20).split(extracted)
    assert any(a.end_char > b.start_char for a, b in itertools.pairwise(overlapping))
    disjoint = Chunker(tokens, 50, 0).split(extracted)
    assert all(a.end_char <= b.start_char for a, b in itertools.pairwise(disjoint))
    check_spans(extracted, overlapping, tokens, 50)
    check_spans(extracted, disjoint, tokens, 50)


def test_chunks_fill_the_budget(tokens: Callable[[str], int]) -> None:
    extracted = ExtractedText(" ".join(PARAGRAPHS * 3), None)
    spans = Chunker(tokens, 200, 0).split(extracted)
    # All but the last chunk come close to the budget: counts add up, nothing is double-counted.
    assert min(tokens(span.text) for span in spans[:-1]) >= 150


def test_sentences_are_kept_whole_when_they_fit(tokens: Callable[[str], int]) -> None:
    extracted = ExtractedText(" ".join(PARAGRAPHS), None)
    for span in Chunker(tokens, 60, 0).split(extracted):
        assert span.text[-1] in ".!?", span.text


def test_repeated_text_gets_the_offsets_of_each_occurrence(tokens: Callable[[str], int]) -> None:
    paragraph = CORPUS["rust"].paragraphs[0]
    extracted = ExtractedText("\n\n".join([paragraph] * 6), None)
    spans = Chunker(tokens, 50, 10).split(extracted)
    check_spans(extracted, spans, tokens, 50)
    assert len({span.start_char for span in spans}) == len(spans)


def test_text_without_separators_is_still_cut_to_the_window(tokens: Callable[[str], int]) -> None:
    blob = "QmFzZTY0IGJsb2IgZnJvbSBhbiBhdHRhY2htZW50" * 200
    cjk = "土星には百を超える衛星があり、最大のタイタンは厚い窒素の大気を持つ。" * 40
    for text in (blob, cjk):
        extracted = ExtractedText(text, None)
        spans = Chunker(tokens, 64, 8).split(extracted)
        assert len(spans) > 1
        check_spans(extracted, spans, tokens, 64)


def test_overlap_must_be_smaller_than_the_chunk(tokens: Callable[[str], int]) -> None:
    with pytest.raises(ConfigurationError, match="overlap must be smaller"):
        Chunker(tokens, chunk_tokens=32, overlap_tokens=32)


def test_a_large_document_is_chunked_in_linear_time(tokens: Callable[[str], int]) -> None:
    # 1 MB of distinct paragraphs (no cache hits across copies); quadratic work would take
    # minutes here, linear work takes a few seconds on 2 cores.
    paragraphs = [f"Section {i}. {PARAGRAPHS[i % len(PARAGRAPHS)]}" for i in range(6000)]
    extracted = ExtractedText("\n\n".join(paragraphs)[:1_000_000], None)
    started = time.perf_counter()
    spans = Chunker(tokens, 200, 30).split(extracted)
    assert time.perf_counter() - started < 30
    assert spans[-1].end_char == len(extracted.text.rstrip())
    assert all(extracted.text[s.start_char : s.end_char] == s.text for s in spans)
