"""The lexical index: BM25 over the chunks' terms, as tables of the registry's database.

A postings table in SQL, not an engine of its own, so the index is wherever the registry is:
the embedded SQLite file, or the PostgreSQL every API process and worker shares. Postings are
written and removed in the same transactions as the chunk rows they index, which the vectors
precede (jobs.py): the lexical index never holds a chunk the registry does not.

Scores are BM25 (Robertson's weighting with Lucene's non-negative IDF):

    score(q, c) = sum over distinct terms t of q and c of
                  idf(t) * tf(t, c) * (k1 + 1) / (tf(t, c) + k1 * (1 - b + b * len(c) / avglen))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

N, df and avglen are the tenant's, over every chunk it holds (those of documents still being
indexed included; the service's ready guard removes their hits, not their statistics); df is
kept per term (``LexicalTermRow``) rather than counted per search.

What is exact and what is not. Every score returned is the exact BM25 of its chunk. Which
chunks are scored is decided by a first pass that reads only the POSTINGS_PER_TERM best
postings of each query term, by impact (a posting's BM25 saturation at a fixed reference
length, so a term's order does not move with the tenant's average), and keeps the
RESCORED_CHUNKS chunks with the highest sum of IDF times impact ("champion lists", Manning,
Raghavan and Schütze, Introduction to Information Retrieval, 7.1). Terms held by fewer chunks
than that are read whole. A chunk whose postings of the common query terms all rank below
those terms' best, and that holds none of the rarer ones, is not found. Why: scoring every
posting of every query term grows with the store (at 100k chunks 10k-60k postings per
question, about 18 ms of CPU, more than the whole dense search), while this reads a bounded
number. At 100k chunks on the benchmark's questions the top 10 agree with exact BM25's for
0.96 of their chunks, the top 50 for 0.88; on the shipped eval set (667 chunks, every term
read whole) the results are exactly BM25's (docs/benchmarks.md, "Hybrid retrieval").
"""

from __future__ import annotations

import functools
import math
import typing
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    CursorResult,
    Double,
    Index,
    Integer,
    Select,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Mapped, Session, mapped_column

from impl.db import Base
from impl.rag.terms import terms
from impl.rag.types import Chunk, TermStatistics

K1 = 1.2
B = 0.75
# A posting's impact is its BM25 saturation at this chunk length, in units of 1/IMPACT_SCALE:
# a fixed length, not the tenant's average, so that a term's order never changes as the
# tenant's chunks come and go.
REFERENCE_LENGTH = 64
IMPACT_SCALE = 10_000
# The first pass reads this many postings of each query term, the best by impact ...
POSTINGS_PER_TERM = 1000
# ... and the second scores this many of the chunks it found exactly (or ``limit``, if more).
RESCORED_CHUNKS = 200


def impact(frequency: int, chunk_terms: int) -> int:
    """A posting's rank among its term's: its BM25 saturation in a chunk of ``chunk_terms``
    terms at REFERENCE_LENGTH (migration 0006 computes the same in SQL)."""
    length = 1 - B + B * chunk_terms / REFERENCE_LENGTH
    return int(IMPACT_SCALE * frequency * (K1 + 1) / (frequency + K1 * length) + 0.5)


class PostingRow(Base):
    """One term of one chunk: how often it occurs there, and the chunk's length in terms (kept
    on every posting so that scoring reads postings only).

    On SQLite the table is WITHOUT ROWID: its rows are stored in primary-key order, so a
    query's terms are each one contiguous range holding every column scoring reads. With a rowid
    each posting found through the key's index cost a second lookup in the table, which made
    BM25 about 1.6 times the CPU (scripts/bench, docs/benchmarks.md)."""

    __tablename__ = "lexical_postings"
    tenant: Mapped[str] = mapped_column(String(256), primary_key=True)
    term: Mapped[str] = mapped_column(String(64), primary_key=True)
    chunk_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    document_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    frequency: Mapped[int] = mapped_column(Integer)
    chunk_terms: Mapped[int] = mapped_column(Integer)
    impact: Mapped[int] = mapped_column(Integer, server_default=text("0"))

    __table_args__ = (
        Index("ix_lexical_postings_document", "document_id"),
        # Each term's postings best first, with every column the first pass reads or filters
        # on: the first pass reads a term's best postings from this index alone.
        Index(
            "ix_lexical_postings_impact",
            "tenant",
            "term",
            "impact",
            "chunk_id",
            "document_id",
            "version",
        ),
        {"sqlite_with_rowid": False},
    )


class LexicalStatsRow(Base):
    """A tenant's chunk count and total length in terms: BM25's N and average length."""

    __tablename__ = "lexical_stats"
    tenant: Mapped[str] = mapped_column(String(256), primary_key=True)
    chunks: Mapped[int] = mapped_column(Integer)
    terms: Mapped[int] = mapped_column(Integer)


class LexicalTermRow(Base):
    """How many of a tenant's chunks hold a term: BM25's document frequency, kept in the
    transactions that write and remove the postings, so that a search reads it instead of
    counting the term's postings (a common term's are tens of thousands at 100k chunks)."""

    __tablename__ = "lexical_terms"
    tenant: Mapped[str] = mapped_column(String(256), primary_key=True)
    term: Mapped[str] = mapped_column(String(64), primary_key=True)
    chunks: Mapped[int] = mapped_column(Integer)

    __table_args__ = ({"sqlite_with_rowid": False},)


@dataclass(frozen=True)
class LexicalHit:
    chunk_id: str
    document_id: str
    version: int
    score: float


def index_chunks(session: Session, tenant: str, chunks: Sequence[Chunk]) -> None:
    """Add the chunks' postings and count them in the tenant's statistics."""
    postings: list[dict[str, Any]] = []
    holding: Counter[str] = Counter()
    total_terms = 0
    for chunk in chunks:
        counts = Counter(terms(chunk.text))
        length = sum(counts.values())
        total_terms += length
        holding.update(counts.keys())
        postings.extend(
            {
                "tenant": tenant,
                "term": term,
                "chunk_id": chunk.id,
                "document_id": chunk.document_id,
                "version": chunk.version,
                "frequency": frequency,
                "chunk_terms": length,
                "impact": impact(frequency, length),
            }
            for term, frequency in counts.items()
        )
    if postings:
        # A Core insert of the table, not the ORM's bulk insert: no per-row ORM bookkeeping.
        # In key order, so SQLite walks the postings' B-tree forward instead of jumping
        # about it (a sixth less CPU per chunk; docs/benchmarks.md, "Worker scaling").
        postings.sort(key=itemgetter("term"))
        session.execute(insert(typing.cast(Table, PostingRow.__table__)), postings)
        upsert = (
            sqlite_insert(LexicalTermRow)
            if session.get_bind().dialect.name == "sqlite"
            else postgresql_insert(LexicalTermRow)
        )
        # In term order, as removals go: two transactions that count the same terms wait
        # for each other instead of deadlocking.
        session.execute(
            upsert.on_conflict_do_update(
                index_elements=[LexicalTermRow.tenant, LexicalTermRow.term],
                set_={"chunks": LexicalTermRow.chunks + upsert.excluded.chunks},
            ),
            [
                {"tenant": tenant, "term": term, "chunks": count}
                for term, count in sorted(holding.items())
            ],
        )
    _count(session, tenant, len(chunks), total_terms)


def remove_documents(session: Session, document_ids: Collection[str]) -> None:
    """Remove the postings of these documents' chunks (every version) and uncount them from
    their tenants' statistics; the caller deletes the chunk rows in the same transaction."""
    if document_ids:
        _remove(session, PostingRow.document_id.in_(list(document_ids)))


def remove_version(session: Session, document_id: str, version: int) -> None:
    """``remove_documents`` for one version of one document."""
    _remove(session, and_(PostingRow.document_id == document_id, PostingRow.version == version))


def _remove(session: Session, which: ColumnElement[bool]) -> None:
    removed = session.execute(
        select(
            PostingRow.tenant,
            func.count(func.distinct(PostingRow.chunk_id)),
            func.sum(PostingRow.frequency),
        )
        .where(which)
        .group_by(PostingRow.tenant)
    ).all()
    holding = session.execute(
        select(PostingRow.tenant, PostingRow.term, func.count())
        .where(which)
        .group_by(PostingRow.tenant, PostingRow.term)
        .order_by(PostingRow.tenant, PostingRow.term)
    ).all()
    session.execute(delete(PostingRow).where(which))
    if holding:
        tenant_, term_ = bindparam("tenant_", type_=String), bindparam("term_", type_=String)
        which_term = and_(LexicalTermRow.tenant == tenant_, LexicalTermRow.term == term_)
        counts = [{"tenant_": t, "term_": term, "held": count} for t, term, count in holding]
        # On the Core connection: the ORM takes a list of parameters to an UPDATE as rows
        # to update by primary key.
        connection = session.connection()
        connection.execute(
            update(LexicalTermRow)
            .where(which_term)
            .values(chunks=LexicalTermRow.chunks - bindparam("held", type_=Integer)),
            counts,
        )
        connection.execute(
            delete(LexicalTermRow).where(which_term, LexicalTermRow.chunks <= 0),
            [{"tenant_": t, "term_": term} for t, term, _ in holding],
        )
    for tenant, chunks, total_terms in removed:
        _count(session, tenant, -int(chunks), -int(total_terms))


def _count(session: Session, tenant: str, chunks: int, total_terms: int) -> None:
    if chunks == 0 and total_terms == 0:
        return
    changed = session.execute(
        update(LexicalStatsRow)
        .where(LexicalStatsRow.tenant == tenant)
        .values(chunks=LexicalStatsRow.chunks + chunks, terms=LexicalStatsRow.terms + total_terms)
    )
    if typing.cast(CursorResult[Any], changed).rowcount == 0:
        session.add(LexicalStatsRow(tenant=tenant, chunks=chunks, terms=total_terms))
        session.flush()


_STATS = select(LexicalStatsRow.chunks, LexicalStatsRow.terms).where(
    LexicalStatsRow.tenant == bindparam("tenant")
)


def _term_params(count: int) -> list[BindParameter[str]]:
    return [bindparam(f"t{i}", type_=String) for i in range(count)]


@functools.cache
def _document_frequencies(term_count: int) -> Select[str, int]:
    return select(LexicalTermRow.term, LexicalTermRow.chunks).where(
        LexicalTermRow.tenant == bindparam("tenant"),
        LexicalTermRow.term.in_(_term_params(term_count)),
    )


@functools.cache
def _scoring(
    term_count: int, only: bool, excluding: bool, pinned: int
) -> Select[str, str, int, float]:
    """BM25 for the terms :t<i> (whose IDF is :idf<i>), best first, in two passes: the first
    reads the :postings best postings of each term by impact (an index range per term, with
    the search's scope inside, so that a narrow scope still finds its chunks below the
    tenant's best) and keeps the :rescored chunks with the highest sum of IDF times impact;
    the second scores those chunks exactly from all their postings of the query's terms.
    One statement per shape, built once, so that a search only binds its values. The
    arithmetic is in double precision on every backend. ``pinned``: how many documents are
    searched in one version only (:pinned_document<i> in :pinned_version<i>)."""
    number: Double[float] = Double()
    terms_ = _term_params(term_count)
    idfs = [bindparam(f"idf{i}", type_=number) for i in range(term_count)]
    reads = []
    for term, idf in zip(terms_, idfs, strict=True):
        read = (
            select(PostingRow.chunk_id, (idf * PostingRow.impact).label("weight"))
            .where(PostingRow.tenant == bindparam("tenant"), PostingRow.term == term)
            .order_by(PostingRow.impact.desc())
            .limit(bindparam("postings", type_=Integer))
        )
        if only:
            read = read.where(PostingRow.document_id.in_(bindparam("only", expanding=True)))
        if excluding:
            read = read.where(PostingRow.document_id.not_in(bindparam("excluded", expanding=True)))
        for i in range(pinned):
            read = read.where(
                or_(
                    PostingRow.document_id != bindparam(f"pinned_document{i}", type_=String),
                    PostingRow.version == bindparam(f"pinned_version{i}", type_=Integer),
                )
            )
        # SQLite takes a LIMIT inside a compound statement only in a subquery of its own.
        reads.append(select(read.subquery()))
    found = union_all(*reads).subquery() if term_count > 1 else reads[0].subquery()
    candidates = (
        select(found.c.chunk_id)
        .group_by(found.c.chunk_id)
        .order_by(func.sum(found.c.weight).desc(), found.c.chunk_id)
        .limit(bindparam("rescored", type_=Integer))
    )
    term_idf = case(
        *((PostingRow.term == term, idf) for term, idf in zip(terms_, idfs, strict=True))
    )
    frequency = cast(PostingRow.frequency, number)
    k1, b = bindparam("k1", type_=number), bindparam("b", type_=number)
    saturation = (
        frequency
        * (k1 + 1)
        / (
            frequency
            + k1 * (1 - b + b * PostingRow.chunk_terms / bindparam("average_length", type_=number))
        )
    )
    score = func.sum(term_idf * saturation).label("score")
    # A chunk's id names its document and version, so the scope applied in the first pass
    # holds for every posting of the chunks it kept.
    return (
        select(PostingRow.chunk_id, PostingRow.document_id, PostingRow.version, score)
        .where(
            PostingRow.tenant == bindparam("tenant"),
            PostingRow.term.in_(terms_),
            PostingRow.chunk_id.in_(candidates),
        )
        .group_by(PostingRow.chunk_id, PostingRow.document_id, PostingRow.version)
        .order_by(score.desc(), PostingRow.chunk_id)
        .limit(bindparam("limit", type_=Integer))
    )


def search(
    session: Session,
    tenant: str,
    query: str,
    *,
    limit: int,
    document_ids: Collection[str] | None,
    exclude_documents: Collection[str],
    only_versions: Mapping[str, int],
) -> list[LexicalHit]:
    """The ``limit`` chunks of the tenant with the highest BM25 for ``query``, best first;
    only of ``document_ids`` when given, never of ``exclude_documents``, and of the documents
    in ``only_versions`` only that version."""
    query_terms = sorted(set(terms(query)))
    if not query_terms or document_ids == set():
        return []
    # Core statements on the session's connection: the ORM's execution path and building the
    # statement anew cost more CPU than SQLite's scan of a 10k-chunk store (docs/benchmarks.md).
    connection = session.connection()
    stats = connection.execute(_STATS, {"tenant": tenant}).first()
    if stats is None or stats.chunks <= 0:
        return []
    term_params = {f"t{i}": term for i, term in enumerate(query_terms)}
    frequencies = dict(
        connection.execute(
            _document_frequencies(len(query_terms)), {"tenant": tenant, **term_params}
        ).all()
    )
    if not frequencies:
        return []
    params: dict[str, Any] = {
        "tenant": tenant,
        "limit": limit,
        "postings": POSTINGS_PER_TERM,
        "rescored": max(RESCORED_CHUNKS, limit),
        "average_length": max(stats.terms / stats.chunks, 1.0),
        "k1": K1,
        "b": B,
    }
    for i, (term, df) in enumerate(sorted(frequencies.items())):
        params[f"t{i}"] = term
        params[f"idf{i}"] = math.log(1 + (stats.chunks - df + 0.5) / (df + 0.5))
    if document_ids is not None:
        params["only"] = list(document_ids)
    if exclude_documents:
        params["excluded"] = list(exclude_documents)
    for i, (document_id, version) in enumerate(only_versions.items()):
        params[f"pinned_document{i}"] = document_id
        params[f"pinned_version{i}"] = version
    statement = _scoring(
        len(frequencies), document_ids is not None, bool(exclude_documents), len(only_versions)
    )
    return [
        LexicalHit(chunk_id=chunk_id, document_id=document_id, version=version, score=float(value))
        for chunk_id, document_id, version, value in connection.execute(statement, params)
    ]


def term_statistics(session: Session, tenant: str, query_terms: Collection[str]) -> TermStatistics:
    """The tenant's chunk count and the document frequency of each of ``query_terms`` it holds:
    the figures BM25's idf is made of, for weighing terms by their rarity in the collection."""
    stats = session.get(LexicalStatsRow, tenant)
    if stats is None or not query_terms:
        return TermStatistics(chunks=stats.chunks if stats else 0, frequencies={})
    frequencies = session.execute(
        select(LexicalTermRow.term, LexicalTermRow.chunks).where(
            LexicalTermRow.tenant == tenant, LexicalTermRow.term.in_(sorted(set(query_terms)))
        )
    ).all()
    return TermStatistics(chunks=stats.chunks, frequencies=dict(frequencies))
