"""Extracted text to chunks that fit the embedding model's window, each located by character
offsets (and page, for PDF) in the text it came from, so citations can point back into it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from langchain_text_splitters import RecursiveCharacterTextSplitter

from impl.errors import ConfigurationError
from impl.rag.loaders import ExtractedText

# Coarsest first: paragraphs, lines, sentences (Latin and CJK punctuation), clauses, words, and
# characters as the last resort for text without any of these.
_NON_SPACE = re.compile(r"\S")
_SEPARATORS = ["\n\n", "\n", ". ", "? ", "! ", "\u3002", "\uff1f", "\uff01", "; ", ", ", " ", ""]


@dataclass(frozen=True)
class ChunkSpan:
    index: int
    text: str
    start_char: int
    end_char: int
    page: int | None


class Chunker:
    """Splits text into chunks of at most ``chunk_tokens`` tokens as ``count_tokens`` counts
    them, with about ``overlap_tokens`` tokens repeated between neighbours. Safe to share between
    threads."""

    def __init__(
        self, count_tokens: Callable[[str], int], chunk_tokens: int, overlap_tokens: int
    ) -> None:
        if chunk_tokens < 1 or not 0 <= overlap_tokens < chunk_tokens:
            raise ConfigurationError(
                f"chunks of {chunk_tokens} tokens cannot overlap by {overlap_tokens} tokens: "
                "the overlap must be smaller than the chunk"
            )
        self._count_tokens = count_tokens
        self._chunk_tokens = chunk_tokens
        self._overlap_tokens = overlap_tokens

    def split(self, extracted: ExtractedText) -> list[ChunkSpan]:
        text = extracted.text
        count = self._cached_counter()
        splitter = RecursiveCharacterTextSplitter(
            separators=_SEPARATORS,
            # Punctuation stays with the sentence it ends.
            keep_separator="end",
            chunk_size=self._chunk_tokens,
            chunk_overlap=self._overlap_tokens,
            length_function=count,
        )
        spans: list[ChunkSpan] = []
        start, end = -1, 0
        for chunk in splitter.split_text(text):
            start = self._locate(text, chunk, start, end, count)
            end = start + len(chunk)
            spans.append(ChunkSpan(len(spans), chunk, start, end, extracted.page_at(start)))
        return spans

    def _locate(
        self,
        text: str,
        chunk: str,
        previous_start: int,
        previous_end: int,
        count: Callable[[str], int],
    ) -> int:
        """Where ``chunk`` starts. The splitter returns substrings of the text in order but not
        their offsets (its own start_index mixes tokens and characters when the length is not
        len()). A chunk starts after the previous one's start and no later than the first
        non-space after its end. In repetitive text several places fit; the earliest whose
        overlap with the previous chunk stays within the overlap budget is the splitter's choice,
        except inside one long run of a repeated character, where the offsets may point at an
        identical copy a little earlier (the text at them is still exactly the chunk)."""
        next_word = _NON_SPACE.search(text, previous_end)
        boundary = next_word.start() if next_word else len(text)
        candidates: list[int] = []
        found = text.find(chunk, previous_start + 1, boundary + len(chunk))
        while found != -1:
            candidates.append(found)
            found = text.find(chunk, found + 1, boundary + len(chunk))
        if not candidates:
            return text.index(chunk, previous_start + 1)
        for candidate in candidates[:-1]:
            if count(text[candidate:previous_end]) <= self._overlap_tokens:
                return candidate
        return candidates[-1]

    def _cached_counter(self) -> Callable[[str], int]:
        """The splitter measures every piece at least twice and the same short words again and
        again; a cache per split() turns that into one tokenizer call per distinct piece."""
        counts: dict[str, int] = {}
        count_tokens = self._count_tokens

        def count(piece: str) -> int:
            known = counts.get(piece)
            if known is None:
                known = counts[piece] = count_tokens(piece)
            return known

        return count
