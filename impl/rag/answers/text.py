"""Text analysis shared by the extractive provider and the citation mapping: a chunk cut into
sentences with their offsets and terms, BM25's idf over them, and a citation of a span."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from impl.rag.terms import terms as index_terms
from impl.rag.terms import word_terms
from impl.rag.types import Citation, SearchHit

MAX_QUOTE_CHARS = 400
"""Longest quote a citation carries; a longer sentence is cut at a clause or word break."""


# Unicode punctuation is written as escapes so the source stays unambiguous to read:
# closing and opening quotes, the ellipsis, and the CJK full stop, exclamation and question marks.
_CLOSERS = "\"')]\u201d\u2019\u300d\u300f"
_OPENERS = "\"'([\u201c\u2018\u00bf\u00a1"
_CJK_STOPS = "\u3002\uff01\uff1f"
_SENTENCE_STOP = re.compile(
    rf"[.!?\u2026]+[{re.escape(_CLOSERS)}]*(?=\s)|[{_CJK_STOPS}]+[{re.escape(_CLOSERS)}]*"
)
_NEXT_CHAR = re.compile(r"\s*(\S)")
WORD = re.compile(r"\w+")
_LAST_WORD = re.compile(r"(\S+)\Z")
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs cf al dr mr mrs ms prof st no nr fig figs eq approx ca inc ltd co jr sr".split()  # noqa: SIM905
)
_BULLET = re.compile(r"[ \t]*(?:[-*\u2022\u00b7\u2013]|\d{1,3}[.)])\s")
_SHORT_LINE_CHARS = 50


def _next_char(text: str, pos: int, endpos: int) -> str:
    match = _NEXT_CHAR.match(text, pos, endpos)
    return match.group(1) if match else ""


def _blocks(text: str) -> Iterable[tuple[int, int]]:
    """Paragraph-like blocks: broken at blank lines, before list items, and after a short line
    followed by a capitalised one (a heading). Other line breaks are wrapped lines of running
    text (PDF extraction keeps them), so a sentence may continue across them."""
    start = pos = 0
    while (newline := text.find("\n", pos)) >= 0:
        line = text[pos:newline].strip()
        if not line:
            yield start, pos
            start = newline + 1
        elif _BULLET.match(text, newline + 1) or (
            len(line) <= _SHORT_LINE_CHARS
            and line[-1] not in ",;(-"
            and _next_char(text, newline + 1, len(text)).isupper()
        ):
            yield start, newline
            start = newline + 1
        pos = newline + 1
    yield start, len(text)


def _is_sentence_end(text: str, stop: re.Match[str], block_end: int) -> bool:
    if stop.group()[0] in _CJK_STOPS:
        return True
    following = _next_char(text, stop.end(), block_end)
    if not (following.isupper() or following.isdigit() or following in _OPENERS):
        return False
    if stop.group()[0] != ".":
        return True
    last = _LAST_WORD.search(text, max(0, stop.start() - 12), stop.start())
    word = last.group(1).lower() if last else ""
    # "Dr. Smith", "e.g. Paris", "J. R. R. Tolkien" do not end sentences.
    return word not in _ABBREVIATIONS and not (len(word) == 1 and word.isalpha())


def _cut_long(text: str, start: int, end: int) -> Iterable[tuple[int, int]]:
    """Cut a span longer than MAX_QUOTE_CHARS at clause breaks, else word breaks, so every
    span can be quoted whole."""
    while end - start > MAX_QUOTE_CHARS:
        window = text[start : start + MAX_QUOTE_CHARS]
        cut = max(window.rfind(mark) for mark in ("; ", ", ", ": ", " \u2013 ", " - "))
        if cut < MAX_QUOTE_CHARS // 2:
            cut = window.rfind(" ")
        cut = cut + 1 if cut > 0 else MAX_QUOTE_CHARS
        yield _strip(text, start, start + cut)
        start = _strip(text, start + cut, end)[0]
    yield start, end


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


_PIECE_PRIOR = 0.85
_HEADING_PRIOR = 0.5
_HEADING_MAX_WORDS = 8
_STOPS = f".!?:;\u2026{_CJK_STOPS}"
_SECTION_NUMBER = re.compile(r"\s*(?:\d+\.)+")
_MARKDOWN_HEADING = re.compile(r"#{1,6}\s")  # not "#define"


@dataclass(frozen=True)
class Span:
    """A sentence of a chunk: ``text == chunk.text[start:end]``."""

    start: int
    end: int
    text: str
    terms: frozenset[str]
    prior: float = 1.0  # below 1 for a piece cut off by the chunk's edge, lower for a heading
    heading: bool = False  # names what follows it and answers nothing by itself
    block: int = 0  # the paragraph it belongs to, counted from the chunk's start


def ends_sentence(text: str) -> bool:
    """Whether the text ends as a sentence does: "end.", "(end.)", but not "f(x)"."""
    return text.rstrip(_CLOSERS)[-1:] in tuple(_STOPS)


def _is_heading(text: str, whole_block: bool) -> bool:
    """A Markdown heading, or a short line of its own without closing punctuation: a title
    ("7. Converting A Database To Text"), a term about to be defined ("SQLITE_OPEN_NOMUTEX"),
    a signature ("ifnull(X,Y)")."""
    return _MARKDOWN_HEADING.match(text) is not None or (
        whole_block
        and not ends_sentence(text)
        and text[-1] != ","
        and len(text.split()) <= _HEADING_MAX_WORDS
    )


def sentence_spans(text: str) -> list[Span]:
    """The sentences of a chunk, with offsets into it."""
    # start, end, block, whether the span is the whole block
    bounds: list[tuple[int, int, int, bool]] = []
    for block, (block_start, block_end) in enumerate(_blocks(text)):
        start = block_start
        for stop in _SENTENCE_STOP.finditer(text, block_start, block_end):
            # "3.1. Heading": a section number does not end a sentence.
            numbered = start == block_start and _SECTION_NUMBER.fullmatch(text, start, stop.end())
            if _is_sentence_end(text, stop, block_end) and not numbered:
                bounds.append((start, stop.end(), block, False))
                start = stop.end()
        bounds.append((start, block_end, block, start == block_start))
    spans: list[Span] = []
    for raw_start, raw_end, block, whole_block in bounds:
        for start, end in _cut_long(text, *_strip(text, raw_start, raw_end)):
            if end > start:
                sentence = text[start:end]
                # A name's parts count as words, as in the lexical index: the sentence naming
                # sqlite3_last_insert_rowid() is about inserted rows.
                spans.append(
                    Span(
                        start,
                        end,
                        sentence,
                        frozenset(word_terms(sentence)) | frozenset(index_terms(sentence)),
                        heading=_is_heading(sentence, whole_block),
                        block=block,
                    )
                )
    for index, span in enumerate(spans):
        # Chunks are cut by token count, so the first span may start mid-sentence and the last
        # may stop mid-sentence: such a piece can still hold the answer, but reads worse. A
        # heading or a fragment (no full stop, few words) answers nothing by itself.
        unfinished = not ends_sentence(span.text)
        if span.heading or (unfinished and len(span.text.split()) < 5):
            spans[index] = replace(span, prior=_HEADING_PRIOR)
        elif (index == 0 and not (span.text[0].isupper() or span.text[0] in _OPENERS)) or (
            index == len(spans) - 1 and unfinished
        ):
            spans[index] = replace(span, prior=_PIECE_PRIOR)
    return spans


def bm25_idf(documents: Sequence[frozenset[str]]) -> dict[str, float]:
    """BM25's inverse document frequency of every term of the documents."""
    counts: dict[str, int] = {}
    for terms in documents:
        for term in terms:
            counts[term] = counts.get(term, 0) + 1
    n = len(documents)
    return {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t, df in counts.items()}


def absent_idf(documents: int) -> float:
    """The idf a term would have in none of ``documents`` documents: the highest."""
    return math.log(1 + (documents + 0.5) / 0.5)


def collapse(text: str) -> str:
    return " ".join(text.split())


def make_citation(marker: int, hit: SearchHit, start: int, end: int) -> Citation:
    chunk = hit.chunk
    return Citation(
        marker=marker,
        document_id=chunk.document_id,
        document_title=hit.document_title,
        chunk_id=chunk.id,
        quote=chunk.text[start:end],
        page=chunk.page,
        start_char=chunk.start_char + start,
        end_char=chunk.start_char + end,
    )
