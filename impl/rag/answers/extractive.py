"""The extractive provider: quotes the retrieved sentences that best answer the question, or
says that no passage answers it. No model runs (see the package's docstring)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from impl.rag.answers.base import AnswerProvider, AnswerStream
from impl.rag.answers.text import (
    MAX_QUOTE_CHARS,
    WORD,
    Span,
    absent_idf,
    bm25_idf,
    collapse,
    ends_sentence,
    make_citation,
    sentence_spans,
)
from impl.rag.terms import word_terms
from impl.rag.types import Citation, SearchHit, TermStatisticsLookup

MAX_EXTRACTIVE_SENTENCES = 3


NO_ANSWER = "No passage in the documents answers this question."
"""The whole answer when no retrieved passage answers the question; it cites nothing."""

# After "how", these words ask for a quantity ("how often", "how many") that the answer states
# ("twice a day") without repeating them.
_QUANTITY_WORDS = frozenset("often many much long far old big large fast".split())  # noqa: SIM905
# Two words after "how", these ask for a way to do something ("how do I", "how can we"): the
# answer names the command, function or setting that does it.
_ASKERS = frozenset("i we you one".split())  # noqa: SIM905
# Words that frame a request rather than name its subject ("what does X mean", "how do I get
# X", "how do I find out X", "is there a way to"): the passage that answers need not repeat
# them.
_REQUEST_WORDS = frozenset(
    """able already anything find finding get gets getting got happen happened happens instead
    know lot lots make makes making mean meaning means meant need needs possible see something
    still tell thing things use used uses using want wants way ways""".split()  # noqa: SIM905
)
# What surrounds a word of a question without being part of it.
_EDGE_PUNCTUATION = "\"',;:!?()[]{}<>\u201c\u201d\u2018\u2019"
_CALL = re.compile(r"[\"'(\[]*([A-Za-z_]\w+)\(")  # ifnull(), iif(X,Y,Z), wal_checkpoint(FULL)
_FLAG = re.compile(r"--?[a-z][\w-]*")  # --no-ignore, -v
_DOT_COMMAND = re.compile(r"\.[a-z]\w*")  # .schema, .gitignore
_SETTING = re.compile(r"(\w+)=\w+")  # mode=ro, synchronous=OFF: the name is the identifier
_CAMEL_CASE = re.compile(r"[a-z][A-Z]")
_CODE_WORD = re.compile(r"[A-Za-z]+\d+\w*")  # E1234, utf8, sha256, x86_64
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:(?:\.|::)\w+)+")  # os.path.join, setup.py, std::fs
_PATH = re.compile(r"(?:~|\.{1,2})?/[\w.-]+(?:/[\w.-]*)*")  # /etc/passwd, ./configure
# A name of two or more parts, and all of it but its last part: "sqlite3_bind_" of
# "sqlite3_bind_int", "os.path." of "os.path.join".
_FAMILY = re.compile(r"([\w.:]+(?:_|\.|::))[a-z0-9]+\Z")
_HYPHENATED = re.compile(r"\w+(?:-\w+)+")
_BACKTICKED = re.compile(r"`([^`\n]+)`")
_QUANTITY = re.compile(
    r"\d|\b(?:once|twice|daily|weekly|monthly|hourly|every|one|two|three|four|five|six|seven"
    r"|eight|nine|ten|twelve|twenty|hundred|thousand|million|billion)\b",
    re.IGNORECASE,
)
# An identifier weighs this many times its idf: it names exactly what the question is about.
_IDENTIFIER_BOOST = 2.0
# How much a term of the heading above a unit counts towards the unit's match.
_HEADING_SHARE = 1.0


def _is_identifier(word: str) -> bool:
    lowered = word.lower()
    if any(p.fullmatch(lowered) for p in (_FLAG, _DOT_COMMAND, _PATH)):
        return True
    if not any(c.isalpha() for c in word):
        return False
    return bool(
        ("_" in word.strip("_") and word.replace("_", "").isalnum())
        or (_CAMEL_CASE.search(word) and word.isalnum())
        or _CODE_WORD.fullmatch(word)
        or (_DOTTED.fullmatch(word) and max(len(part) for part in re.split(r"\.|::", word)) > 1)
    )


def _identifiers(question: str) -> frozenset[str]:
    """The names a question asks about, lowercased: function names, flags, dot-commands,
    settings, snake_case, CamelCase, dotted.names, paths, error codes, anything in backticks."""
    found = {quoted.strip().lower() for quoted in _BACKTICKED.findall(question)}
    for raw in question.replace("`", " ").split():
        call = _CALL.match(raw)
        if call:
            found.add(call.group(1).lower())
            continue
        word = raw.strip(_EDGE_PUNCTUATION).rstrip(".")
        setting = _SETTING.fullmatch(word)
        if setting:
            found.add(setting.group(1).lower())
        elif len(word) > 1 and _is_identifier(word):
            found.add(word.lower())
    return frozenset(found - {""})


def _setting_values(question: str) -> frozenset[str]:
    """The values a question sets that are common words ("synchronous=OFF", "mode=on"): they
    are what it asks about, though plain text would drop them as stop words. Other values are
    content words already."""
    values = set()
    for raw in question.replace("`", " ").split():
        setting = _SETTING.fullmatch(raw.strip(_EDGE_PUNCTUATION).rstrip("."))
        value = setting.group()[len(setting.group(1)) + 1 :].lower() if setting else ""
        if len(value) > 1 and value.isalpha() and not word_terms(value):
            values.add(value)
    return frozenset(values)


def _identifier_pattern(identifier: str) -> re.Pattern[str]:
    # Whole: "--color" is not in "--colors", "os.path" is in "os.path.join(a)". Documentation
    # names a family of functions with a wildcard for the last part ("the sqlite3_bind_*()
    # routines", "os.path.*"): that names each member too.
    whole = rf"{re.escape(identifier)}(?![\w-])"
    family = _FAMILY.match(identifier)
    if family:
        whole += rf"|{re.escape(family.group(1))}\*"
    return re.compile(rf"(?<![\w-])(?:{whole})")


@dataclass(frozen=True)
class _Question:
    terms: frozenset[str]  # stemmed content terms, and the identifiers whole
    identifiers: frozenset[str]
    quantity: bool  # asks "how often", "how many", ...: the answer states a number
    # How each identifier, and each common-word setting value, is found in text.
    patterns: tuple[tuple[str, re.Pattern[str]], ...]
    way: bool  # asks "how do I ...": the answer names the command, function or setting
    shares: dict[str, float]  # the parts of hyphenated words, and the share each weighs


def _question(text: str) -> _Question:
    """What a question asks about: its content terms without the words that frame the request,
    its identifiers, whether it asks for a quantity."""
    words = WORD.findall(text.lower())
    kept = [
        word
        for index, word in enumerate(words)
        if word not in _REQUEST_WORDS
        and not (index > 0 and words[index - 1] == "how" and word in _QUANTITY_WORDS)
    ]
    identifiers = _identifiers(text)
    values = _setting_values(text)
    # The parts of a hyphenated word ("write-ahead", "read-only") name one thing: together they
    # weigh as one term, not as two.
    shares: dict[str, float] = {}
    for compound in _HYPHENATED.findall(text):
        parts = [part for part in word_terms(compound) if len(part) > 2]  # not "re-", "e-"
        for part in parts:
            shares[part] = min(shares.get(part, 1.0), 1 / len(parts))
    for term in word_terms(_HYPHENATED.sub(" ", text)):
        shares.pop(term, None)  # also a word of its own
    return _Question(
        terms=frozenset(word_terms(" ".join(kept))) | identifiers | values,
        identifiers=identifiers,
        quantity=any(
            words[i - 1] == "how" and words[i] in _QUANTITY_WORDS for i in range(1, len(words))
        ),
        patterns=tuple((i, _identifier_pattern(i)) for i in sorted(identifiers | values)),
        shares=shares,
        way=any(words[i] == "how" and words[i + 2] in _ASKERS for i in range(len(words) - 2)),
    )


@dataclass(frozen=True)
class _Unit:
    """What may be quoted: a sentence, or a heading or a lead-in ending in ":" joined to what
    follows it. ``first`` to ``last`` index the chunk's spans, ``start`` and ``end`` its text."""

    rank: int  # of the hit it comes from
    first: int
    last: int
    start: int
    end: int
    terms: frozenset[str]  # including the question's identifiers it holds
    about: frozenset[str]  # the terms of the heading of its section (in its chunk)
    nearness: float  # how close under that heading it starts
    # States what the question asks for: a number or a frequency for a quantity question, a
    # name (a function, a command, a setting) the question does not already hold for a way.
    states_asked: bool
    words: int
    prior: float


def _unit_bounds(spans: Sequence[Span]) -> list[tuple[int, int]]:
    """Spans grouped into units: a heading takes the text under it (through any further
    headings), and a lead-in ending in ":" the one line it introduces (a command, a value, a
    list item), as far as a quote can hold. A heading with nothing under it in the chunk is
    left out."""
    bounds = []
    first = 0
    while first < len(spans):
        last = first
        while (spans[last].heading or spans[last].text.endswith(":")) and (
            last + 1 < len(spans) and spans[last + 1].end - spans[first].start <= MAX_QUOTE_CHARS
        ):
            last += 1
            if spans[last - 1].text.endswith(":"):
                break
        if not all(span.heading for span in spans[first : last + 1]):
            bounds.append((first, last))
        first = last + 1
    return bounds


@dataclass(frozen=True)
class _Candidates:
    units: list[_Unit]  # without repeats, in hit order
    spans: list[list[Span]]  # per hit: the sentences of its chunk
    chunk_terms: list[frozenset[str]]  # per hit: the terms of its whole chunk


def _candidates(hits: Sequence[SearchHit], question: _Question) -> _Candidates:
    """Every unit of the hits, without repeats.

    Chunks of one document overlap, so a unit may come twice, or whole in one chunk and cut
    in the next: a unit whose document range lies within another's is left out (of equal
    ones, the better-ranked copy stays). Text repeated across documents is also left out."""
    found: list[_Unit] = []
    chunk_spans: list[list[Span]] = []
    chunk_terms: list[frozenset[str]] = []
    # Per document: (start, -end, position), so that sorting puts every range after the
    # ranges that could contain it.
    by_document: dict[str, list[tuple[int, int, int]]] = {}
    for rank, hit in enumerate(hits):
        text = hit.chunk.text
        spans = sentence_spans(text)
        chunk_spans.append(spans)
        lowered = text.lower()
        named = {
            identifier: [match.start() for match in pattern.finditer(lowered)]
            for identifier, pattern in question.patterns
        }
        chunk_terms.append(
            frozenset().union(*(span.terms for span in spans))
            | {identifier for identifier, at in named.items() if at}
        )
        # The latest heading at or above each span: its terms and its index. Its section is
        # about them, the sentences right under it most (they introduce or define it).
        sections: list[tuple[frozenset[str], int]] = []
        section: tuple[frozenset[str], int] = (frozenset(), 0)
        for index, span in enumerate(spans):
            if span.heading:
                heading_terms = span.terms | {
                    identifier
                    for identifier, at in named.items()
                    if any(span.start <= i < span.end for i in at)
                }
                section = (heading_terms, index)
            sections.append(section)
        offset = hit.chunk.start_char
        for first, last in _unit_bounds(spans):
            start, end = spans[first].start, spans[last].end
            terms = frozenset().union(*(span.terms for span in spans[first : last + 1])) | {
                identifier
                for identifier, at in named.items()
                if any(start <= i and i + len(identifier) <= end for i in at)
            }
            body = next((i for i in range(first, last + 1) if not spans[i].heading), last)
            by_document.setdefault(hit.chunk.document_id, []).append(
                (offset + start, -(offset + end), len(found))
            )
            found.append(
                _Unit(
                    rank=rank,
                    first=first,
                    last=last,
                    start=start,
                    end=end,
                    terms=terms,
                    about=sections[body][0],
                    # 1 for the sentence right under the heading, 1/2 for the next, ...
                    nearness=1 / max(1, body - sections[body][1]),
                    states_asked=(
                        question.quantity
                        and _QUANTITY.search(text, spans[body].start, end) is not None
                    )
                    or (
                        question.way
                        and bool(_identifiers(text[spans[body].start : end]) - question.identifiers)
                    ),
                    # A heading names the body; only the body's length dilutes its match.
                    words=len(WORD.findall(text, spans[body].start, end)),
                    prior=spans[body].prior,
                )
            )
    keep = [True] * len(found)
    for ranges in by_document.values():
        furthest = -1
        for _, negative_end, position in sorted(ranges):
            keep[position] = -negative_end > furthest
            furthest = max(furthest, -negative_end)
    seen: set[str] = set()
    unique = []
    for position, unit in enumerate(found):
        key = collapse(hits[unit.rank].chunk.text[unit.start : unit.end]).lower()
        if keep[position] and key not in seen:
            seen.add(key)
            unique.append(unit)
    return _Candidates(unique, chunk_spans, chunk_terms)


def _bm25(
    weights: dict[str, float],
    asked_weight: float,
    units: Sequence[_Unit],
    k1: float = 1.2,
    b: float = 0.5,
) -> list[float]:
    """BM25 of each unit for the weighted distinct query terms. Sentences rarely repeat a term,
    so term frequency is taken as 1; a term of the heading of the unit's section counts again,
    by _HEADING_SHARE and the unit's nearness to it, so the text under "sqlite3_open()" is
    about it, its first sentence most. The length normalisation is milder than BM25's usual
    b = 0.75: among sentences, the one that answers is often the longer one. A unit that states
    a number, or a name, as the question asks (``states_asked``) matches ``asked_weight``
    more."""
    mean = sum(unit.words for unit in units) / len(units)
    scores = []
    for unit in units:
        norm = k1 * (1 - b + b * unit.words / mean) if mean else k1
        matched = sum(w for t, w in weights.items() if t in unit.terms) + (
            _HEADING_SHARE * unit.nearness * sum(w for t, w in weights.items() if t in unit.about)
        )
        if unit.states_asked:
            matched += asked_weight
        scores.append(matched * (k1 + 1) / (1 + norm))
    return scores


def dense_score(hit: SearchHit) -> float | None:
    """The hit's cosine similarity to the question: its dense signal's score, or its score when
    it carries no per-signal explanation (a dense-only search); None when only other signals
    found it."""
    dense = hit.explain.get("dense")
    if dense is not None:
        return dense.score
    return hit.score if not hit.explain else None


# How a unit's score is made: how well it matches the question and how high its chunk ranked in
# the search, about equally (measured on the labelled set: the search's order is the better
# judge of which chunk answers, the words of which sentence in it), a little for coming early in
# its chunk.
_LEXICAL_WEIGHT = 0.5
_RETRIEVAL_WEIGHT = 0.48
_POSITION_WEIGHT = 0.02
# A further unit joins the answer when it matches the question and scores at least this share
# of the best one: the best-scored unit is often a close paraphrase of the question, the answer
# in the next one.
_FOLLOWER_SHARE = 0.5
# The share of the question's idf-weighted terms that a quoted passage (with its document's
# title) must hold to answer on words alone, whatever its cosine.
_MIN_COVERAGE = 0.6
# A chunk that both the dense and the lexical signal rank this high, holding the names the
# question asks about, answers whatever its cosine.
_AGREED_RANK = 2


@dataclass
class _Passage:
    """Adjacent units quoted from one chunk, cited with one marker."""

    hit: SearchHit
    rank: int  # of the hit
    first: int
    last: int
    start: int
    end: int
    terms: set[str]  # the question's terms it holds
    states_asked: bool = False  # one of its units states what the question asks for


def _continues(spans: Sequence[Span], passage: _Passage, unit: _Unit) -> bool:
    """Whether the unit goes on from the passage, or leads to it, in the same paragraph, so
    one quote can hold both."""
    if unit.first == passage.last + 1:
        joined = spans[passage.last].block == spans[unit.first].block
    elif unit.last + 1 == passage.first:
        joined = spans[unit.last].block == spans[passage.first].block
    else:
        return False
    return joined and max(passage.end, unit.end) - min(passage.start, unit.start) <= MAX_QUOTE_CHARS


def _coverage(question: _Question, passage: _Passage, weights: dict[str, float]) -> float:
    """The share of the question's term ``weights`` that one quoted passage holds, its
    document's title included."""
    held = passage.terms | set(word_terms(passage.hit.document_title))
    total = sum(weights.values())
    return sum(weights[t] for t in question.terms & held) / total if total else 0.0


def _agreed(hit: SearchHit) -> bool:
    """Whether both signals of a hybrid search rank the hit among their best over the whole
    collection: the words and the meaning of the question, judged independently, point at the
    same chunk, which is stronger evidence than either score alone (a cosine or a BM25 score
    says little by itself, and differs between collections). Not enough alone: asked about a
    name the documents lack ("the UID of dave"), both signals still rank first the page that
    lists the other names."""
    signals = hit.explain.values()
    return len(signals) == 2 and all(signal.rank <= _AGREED_RANK for signal in signals)


def _rarity(
    question: _Question, candidates: _Candidates, statistics: TermStatisticsLookup | None
) -> dict[str, float]:
    """The idf of each of the question's terms. Over the whole collection when ``statistics``
    can say it: a term missing from the retrieved chunks but common in the documents ("table",
    "database") is not the subject they lack, while one the documents hold nowhere is. Without
    it, over the retrieved chunks, so a term they all share weighs little, and a term none
    holds weighs most."""
    retrieved = candidates.chunk_terms
    collection = statistics(question.terms) if statistics is not None else None
    if collection is not None and collection.chunks > 0:
        chunks = max(collection.chunks, len(retrieved))
        rarity = {}
        for term in question.terms:
            # The collection holds the retrieved chunks: a name the index keeps in another form
            # (".schema" is indexed as "schema") is held at least where they hold it.
            held = max(collection.frequencies.get(term, 0), sum(term in c for c in retrieved))
            rarity[term] = math.log(1 + (chunks - held + 0.5) / (held + 0.5))
        return rarity
    idf = bm25_idf(retrieved)
    absent = absent_idf(len(retrieved))
    return {t: idf.get(t, absent) for t in question.terms}


def _answers(
    question: _Question,
    passages: Sequence[_Passage],
    candidates: _Candidates,
    min_cosine: float,
    rarity: dict[str, float],
) -> bool:
    """Whether the chosen passages answer the question. Not when a name the question asks
    about (an identifier) is in no retrieved chunk: the documents do not cover it, whatever
    their other words share. Else when a passage holds the question's key terms (weighed by
    ``rarity``), comes from a chunk at least ``min_cosine`` similar to the question, or comes
    from a chunk that both signals of the search rank at the top and that holds the names the
    question asks about (or, when it names none, states the name or number it asks for)."""
    if not question.identifiers <= set().union(*candidates.chunk_terms):
        return False
    weights = {
        t: idf * (_IDENTIFIER_BOOST if t in question.identifiers else 1.0)
        for t, idf in rarity.items()
    }
    for passage in passages:
        cosine = dense_score(passage.hit)
        held = candidates.chunk_terms[passage.rank]
        # Agreement needs the passage to hold what the question names, so that a page listing
        # other names does not answer; a question that names nothing ("how do I stop a
        # long-running query") asks for a name or a number, so the passage must state one.
        holds_asked = question.identifiers <= held if question.identifiers else passage.states_asked
        if (
            (cosine is not None and cosine >= min_cosine)
            or (_agreed(passage.hit) and holds_asked)
            or _coverage(question, passage, weights) >= _MIN_COVERAGE
        ):
            return True
    return False


def _extract(
    question_text: str,
    hits: Sequence[SearchHit],
    min_cosine: float,
    statistics: TermStatisticsLookup | None,
) -> list[Citation]:
    """The quotes that answer the question, in reading order, numbered 1, 2, ...; none when no
    passage answers it (see _answers). ``statistics`` weighs the question's terms by their
    rarity in the whole collection, when given."""
    question = _question(question_text)
    candidates = _candidates(hits, question)
    units = candidates.units
    if not units:  # only whitespace or bare headings were retrieved
        return []
    unit_idf = bm25_idf([unit.terms for unit in units])
    weights = {
        t: unit_idf[t]
        * (_IDENTIFIER_BOOST if t in question.identifiers else question.shares.get(t, 1.0))
        for t in question.terms
        if t in unit_idf
    }
    # A question that asks how often or how many is answered by a number, one that asks how to
    # do something by a name: either weighs as much as the question's weightiest term.
    asked_weight = max(weights.values(), default=1.0) if question.quantity or question.way else 0.0
    lexical = _bm25(weights, asked_weight, units)
    top_lexical = max(lexical)
    top_retrieval = max(hit.score for hit in hits)
    scores = []
    for unit, lex in zip(units, lexical, strict=True):
        retrieval = (
            max(0.0, hits[unit.rank].score) / top_retrieval
            if top_retrieval > 0
            else float(unit.rank == 0)
        )
        score = (
            _LEXICAL_WEIGHT * (lex / top_lexical if top_lexical > 0 else 0.0)
            + _RETRIEVAL_WEIGHT * retrieval
            + _POSITION_WEIGHT / (1 + unit.first)
        )
        scores.append(score * unit.prior)
    order = sorted(range(len(units)), key=lambda i: (-scores[i], i))

    passages: dict[int, _Passage] = {}  # by hit rank: one passage, so one marker, per chunk
    sentences = 0
    for i in order:
        unit = units[i]
        if sentences and (scores[i] < _FOLLOWER_SHARE * scores[order[0]] or not lexical[i]):
            continue
        passage = passages.get(unit.rank)
        if passage is None:
            passages[unit.rank] = _Passage(
                hits[unit.rank], unit.rank, unit.first, unit.last, unit.start, unit.end, set()
            )
        elif _continues(candidates.spans[unit.rank], passage, unit):
            passage.first, passage.last = (
                min(passage.first, unit.first),
                max(passage.last, unit.last),
            )
            passage.start, passage.end = min(passage.start, unit.start), max(passage.end, unit.end)
        else:
            continue  # a distant unit of the same chunk could not share its quote
        passages[unit.rank].terms |= unit.terms & question.terms
        passages[unit.rank].states_asked |= unit.states_asked
        sentences += 1
        if sentences == MAX_EXTRACTIVE_SENTENCES:
            break

    # Enough context: the sentence after a quoted passage, when it goes on in the same
    # paragraph, often holds the value, the name or the consequence the passage leads to ("The
    # VACUUM command with an INTO clause is an alternative to the backup API ..." is followed
    # by the sentence that shows "VACUUM INTO"). Every passage gets it, not only the best: the
    # best-scored one is often a paraphrase of the question, the answer in another.
    for passage in passages.values():
        spans = candidates.spans[passage.rank]
        after = passage.last + 1
        if (
            after < len(spans)
            and (
                spans[after].block == spans[passage.last].block
                or not ends_sentence(spans[passage.last].text)  # a signature, a label: say more
            )
            and spans[after].end - passage.start <= MAX_QUOTE_CHARS
        ):
            passage.last, passage.end = after, spans[after].end
            passage.terms |= spans[after].terms & question.terms

    rarity = _rarity(question, candidates, statistics)
    if not _answers(question, list(passages.values()), candidates, min_cosine, rarity):
        return []

    # Reading order: documents in the order their best passage was chosen, passages within a
    # document in the order they appear in it.
    document_order: dict[str, int] = {}
    for passage in passages.values():
        document_order.setdefault(passage.hit.chunk.document_id, len(document_order))
    ordered = sorted(
        passages.values(),
        key=lambda p: (document_order[p.hit.chunk.document_id], p.hit.chunk.start_char + p.start),
    )
    return [
        make_citation(marker, passage.hit, passage.start, passage.end)
        for marker, passage in enumerate(ordered, start=1)
    ]


class ExtractiveAnswerProvider(AnswerProvider):
    """Answers with the best one to three retrieved passages, each followed by its [n], or
    with NO_ANSWER and no citation when no passage answers. The passages are all chosen before
    the first is sent (it takes about a millisecond); the stream sends them one by one.

    ``min_cosine``: a passage whose chunk is at least this similar to the question (its dense
    cosine) answers even when it words the question's terms differently."""

    name = "extractive"

    def __init__(self, min_cosine: float) -> None:
        self._min_cosine = min_cosine

    def stream(
        self,
        question: str,
        hits: list[SearchHit],
        statistics: TermStatisticsLookup | None = None,
    ) -> AnswerStream:
        citations = _extract(question, hits, self._min_cosine, statistics)
        if not citations:
            yield NO_ANSWER
            return NO_ANSWER, []
        parts = [f"{collapse(citation.quote)} [{citation.marker}]" for citation in citations]
        for index, part in enumerate(parts):
            yield part if index == 0 else f" {part}"
        return " ".join(parts), citations
