"""The interface every answer provider implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator

from impl.rag.types import Citation, SearchHit, TermStatisticsLookup

AnswerStream = Generator[str, None, tuple[str, list[Citation]]]
"""An answer as it is made: yields non-empty deltas of the text, returns ``(text, citations)``
where ``text`` is the deltas concatenated. Errors are impl.errors exceptions (UpstreamError when
the model fails), raised from next(); close() stops the generation."""


class AnswerProvider(ABC):
    name: str

    @abstractmethod
    def stream(
        self,
        question: str,
        hits: list[SearchHit],
        statistics: TermStatisticsLookup | None = None,
    ) -> AnswerStream:
        """The answer to ``question`` from ``hits`` (best first, never empty), as it is made.
        ``statistics`` looks up how rare terms are in the whole collection the hits come from,
        for a provider that weighs the question's terms (without it, only the hits count)."""

    def generate(
        self,
        question: str,
        hits: list[SearchHit],
        statistics: TermStatisticsLookup | None = None,
    ) -> tuple[str, list[Citation]]:
        """The whole answer at once."""
        answer = self.stream(question, hits, statistics)
        while True:
            try:
                next(answer)
            except StopIteration as end:
                result: tuple[str, list[Citation]] = end.value
                return result
