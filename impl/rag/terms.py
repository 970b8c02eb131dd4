"""Words as the lexical index and the answerers compare them.

One analysis for documents and questions alike: lowercased, lightly stemmed, without stop
words. Identifiers are what people search documentation for (``os.path.join``, ``snake_case``,
``CamelCase``, ``--flag``, ``E1234``), so an identifier counts both whole and as its parts: the
question "what does journal_mode do" meets a passage on ``PRAGMA journal_mode`` through the
whole identifier (a rare, decisive term) and one that says "the journal mode" through its parts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

# Word lists are kept as text: as list literals they would take a line per word.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom whose why will with would you your yours yourself
    yourselves""".split()  # noqa: SIM905
)
# A token: a flag (--foo-bar, -x), or a word or identifier whose parts are joined by ".", "::",
# "_" or "-" (os.path.join, std::vector, snake_case, utf-8), or a number with its dots (3.11.2).
_TOKEN = re.compile(r"--?[^\W\d_][\w-]*|\w+(?:(?:\.|::|-)\w+)*")
_PART_SEPARATORS = re.compile(r"[._:\-]+")
# CamelCase humps, acronyms and digit runs: "HTTPServerV2" -> HTTP, Server, V, 2.
_HUMPS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+|[^\W\d_A-Za-z]+")
MAX_TERM_CHARS = 64


@lru_cache(maxsize=65536)
def stem(word: str) -> str:
    """A light suffix stripper that meets "boils", "boiling" and "boiled" at "boil".

    Ranking needs no full Porter stemmer; it needs the question and the passages reduced the
    same way."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, replacement in (
        ("ies", "y"),
        ("sses", "ss"),
        ("ing", ""),
        ("ed", ""),
        ("es", ""),
        ("ly", ""),
        ("s", ""),
    ):
        if word.endswith(suffix):
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                break
            if len(word) - len(suffix) >= 3:
                word = word[: len(word) - len(suffix)] + replacement
            break
    # What suffixes leave behind: "running" -> "runn" -> "run"; "cause", "caused" -> "caus".
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiousl":
        word = word[:-1]
    if len(word) > 3 and word[-1] == "e":
        word = word[:-1]
    return word


def _word_term(word: str) -> str | None:
    """A plain word's term: stemmed; None for a stop word or a stray letter."""
    lowered = word.lower()
    if lowered in STOP_WORDS or (len(lowered) < 2 and not lowered.isdigit()):
        return None
    return stem(lowered)


@lru_cache(maxsize=65536)
def _token_terms(token: str) -> tuple[str, ...]:
    if token.isalnum() and (
        token.islower() or token.isupper() or token.istitle() or token.isdigit()
    ):
        term = _word_term(token)  # a plain word ("Journal", "SQLITE", "sqlite3", "2024")
        return () if term is None else (term,)
    parts = [hump for piece in _PART_SEPARATORS.split(token) for hump in _HUMPS.findall(piece)]
    # An identifier: whole (lowercased, not stemmed: "read_pages" is not "read_page"), then
    # each part as a plain word.
    whole = token.lower()[:MAX_TERM_CHARS]
    return (whole, *(t for t in map(_word_term, parts) if t is not None))


def terms(text: str) -> Iterator[str]:
    """The index terms of a text, in order, repeated as often as they occur."""
    for token in _TOKEN.findall(text):
        yield from _token_terms(token)
