"""The lexical index and hybrid fusion, through the service with real Chroma and the real
embedding model: identifiers found whole and by their parts, BM25 as its formula says, the
explain of every hit, and postings that follow their chunks (delete, failure, earlier data)."""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from impl.rag import lexical
from impl.rag.registry import Registry
from impl.rag.service import RagService
from impl.rag.terms import terms
from impl.rag.types import Chunk, RetrievalOptions
from tests.rag.conftest import ServiceFactory, ingest, text_item

TENANT = "acme"
DENSE, LEXICAL, HYBRID = (RetrievalOptions(mode=m) for m in ("dense", "lexical", "hybrid"))

# Passages about one topic, only one of which names the identifier a user asks about: the
# case where an embedding ranks the passage that is merely about the topic first.
DATABASE_NOTES = {
    "journal": "The PRAGMA journal_mode=WAL setting lets readers continue while a writer "
    "commits; set it once per database file.",
    "tuning": "Tuning a database for many concurrent readers and writers usually starts with "
    "how its transactions lock and how long writers wait for readers.",
    "busy": "When another connection holds the lock, a call returns SQLITE_BUSY; the "
    "busy_timeout setting makes it retry for that many milliseconds instead.",
    "paths": "Use os.path.join to build a path from parts, and the --no-clobber flag keeps "
    "existing files when copying a directory tree.",
    "errors": "Error E1234 means the configuration file could not be parsed: check its "
    "quoting and the encoding of the file.",
}


def ingest_notes(service: RagService) -> dict[str, str]:
    job = ingest(service, TENANT, [text_item(t, title=k) for k, t in DATABASE_NOTES.items()])
    return dict(zip(DATABASE_NOTES, job.document_ids, strict=True))


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ("journal_mode", "journal"),
        ("what does SQLITE_BUSY mean", "busy"),
        ("os.path.join", "paths"),
        ("--no-clobber", "paths"),
        ("E1234", "errors"),
        ("busy timeout", "busy"),  # the parts of busy_timeout
        ("journal mode", "journal"),
    ],
)
def test_identifiers_are_found_whole_and_by_their_parts(
    service: RagService, query: str, key: str
) -> None:
    ids = ingest_notes(service)
    for retrieval in (LEXICAL, HYBRID):
        hits = service.search(TENANT, query, top_k=3, retrieval=retrieval)
        assert hits[0].chunk.document_id == ids[key], (retrieval.mode, query, hits[0])


def test_lexical_scores_are_bm25(make_service: ServiceFactory, registry_url: str) -> None:
    """Every lexical score equals BM25 (k1 1.2, b 0.75, Lucene's IDF) computed here from the
    chunks' own terms, with the registry on SQLite and on PostgreSQL."""
    service = make_service(registry_url=registry_url, registry_auto_upgrade=True)
    ingest_notes(service)
    chunks = [
        chunk
        for document in service.list_documents(TENANT, limit=100, cursor=None).items
        for chunk in service.list_chunks(TENANT, document.id, limit=100, cursor=None).items
    ]
    counts = {chunk.id: Counter(terms(chunk.text)) for chunk in chunks}
    n = len(counts)
    average = sum(sum(c.values()) for c in counts.values()) / n
    query = "readers writers lock busy_timeout"
    query_terms = set(terms(query))

    def bm25(chunk_id: str) -> float:
        c = counts[chunk_id]
        total = 0.0
        for term in query_terms & c.keys():
            df = sum(term in other for other in counts.values())
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            tf = c[term]
            total += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * sum(c.values()) / average))
        return total

    hits = service.search(TENANT, query, top_k=10, retrieval=LEXICAL)
    expected = sorted((cid for cid in counts if bm25(cid) > 0), key=bm25, reverse=True)
    assert [hit.chunk.id for hit in hits] == expected
    for rank, hit in enumerate(hits, start=1):
        assert hit.score == pytest.approx(bm25(hit.chunk.id))
        assert hit.explain == {"lexical": hit.explain["lexical"]}
        assert (hit.explain["lexical"].rank, hit.explain["lexical"].score) == (rank, hit.score)


def test_hybrid_fuses_both_rankings_by_weighted_reciprocal_rank(service: RagService) -> None:
    ingest_notes(service)
    query = "how do I stop readers waiting for a writer"
    dense = service.search(TENANT, query, top_k=5, retrieval=DENSE)
    lexical = service.search(TENANT, query, top_k=5, retrieval=LEXICAL)
    dense_rank = {hit.chunk.id: rank for rank, hit in enumerate(dense, start=1)}
    lexical_rank = {hit.chunk.id: rank for rank, hit in enumerate(lexical, start=1)}
    weighted = RetrievalOptions(mode="hybrid", dense_weight=2.0, lexical_weight=0.5, rrf_k=10)
    hybrid = service.search(TENANT, query, top_k=5, retrieval=weighted)
    assert {hit.chunk.id for hit in hybrid} == dense_rank.keys() | lexical_rank.keys()
    for hit in hybrid:
        expected = 0.0
        if hit.chunk.id in dense_rank:
            assert hit.explain["dense"].rank == dense_rank[hit.chunk.id]
            expected += 2.0 / (10 + dense_rank[hit.chunk.id])
        if hit.chunk.id in lexical_rank:
            assert hit.explain["lexical"].rank == lexical_rank[hit.chunk.id]
            expected += 0.5 / (10 + lexical_rank[hit.chunk.id])
        assert hit.score == pytest.approx(expected)
    assert [hit.score for hit in hybrid] == sorted((hit.score for hit in hybrid), reverse=True)
    # Dense scores in the explain are the dense mode's cosines.
    cosines = {hit.chunk.id: hit.score for hit in dense}
    for hit in hybrid:
        if "dense" in hit.explain:
            assert hit.explain["dense"].score == pytest.approx(cosines[hit.chunk.id])
    # A weight of zero leaves the other signal's order.
    dense_only = RetrievalOptions(mode="hybrid", lexical_weight=0.0, candidates=5)
    ordered = service.search(TENANT, query, top_k=5, retrieval=dense_only)
    assert [hit.chunk.id for hit in ordered][: len(dense)] == [hit.chunk.id for hit in dense]


def postings(data_dir: Path, document_id: str | None = None) -> int:
    with sqlite3.connect(data_dir / "registry.db") as db:
        if document_id is None:
            return int(db.execute("SELECT COUNT(*) FROM lexical_postings").fetchone()[0])
        row = db.execute(
            "SELECT COUNT(*) FROM lexical_postings WHERE document_id = ?", (document_id,)
        ).fetchone()
        return int(row[0])


def stats(data_dir: Path) -> tuple[int, int]:
    with sqlite3.connect(data_dir / "registry.db") as db:
        row = db.execute("SELECT chunks, terms FROM lexical_stats WHERE tenant = ?", (TENANT,))
        found = row.fetchone()
        return (int(found[0]), int(found[1])) if found else (0, 0)


def test_postings_leave_with_their_document(service: RagService, data_dir: Path) -> None:
    ids = ingest_notes(service)
    before = stats(data_dir)
    assert before[0] == len(DATABASE_NOTES) and postings(data_dir, ids["busy"]) > 0
    service.delete_document(TENANT, ids["busy"])
    assert postings(data_dir, ids["busy"]) == 0
    busy_terms = sum(1 for _ in terms(DATABASE_NOTES["busy"]))
    assert stats(data_dir) == (before[0] - 1, before[1] - busy_terms)
    hits = service.search(TENANT, "SQLITE_BUSY busy_timeout", top_k=5, retrieval=LEXICAL)
    assert all(hit.chunk.document_id != ids["busy"] for hit in hits)
    for key in DATABASE_NOTES.keys() - {"busy"}:
        service.delete_document(TENANT, ids[key])
    assert postings(data_dir) == 0 and stats(data_dir) == (0, 0)


def test_chunks_stored_before_the_lexical_index_are_indexed_at_start(
    make_service: ServiceFactory, data_dir: Path
) -> None:
    service = make_service()
    ids = ingest_notes(service)
    service.close()
    # A registry as the release before the lexical index left it: chunk rows, no postings (and
    # no migrations: they came later).
    with sqlite3.connect(data_dir / "registry.db") as db:
        db.execute("DROP TABLE alembic_version")
        # The tables of the lexical index and of the migrations after 0002.
        for table in (
            "lexical_postings",
            "lexical_terms",
            "lexical_stats",
            "originals",
            "document_replacements",
            "retired_versions",
            "idempotency_keys",
            "conversation_turns",
            "conversations",
            "job_events",
            "webhooks",
        ):
            db.execute(f"DROP TABLE {table}")
        db.execute("DELETE FROM meta WHERE key = 'lexical_index'")
    reopened = make_service()
    hits = reopened.search(TENANT, "E1234", top_k=1, retrieval=LEXICAL)
    assert [hit.chunk.document_id for hit in hits] == [ids["errors"]]
    assert stats(data_dir)[0] == len(DATABASE_NOTES)


def test_term_statistics_count_the_chunks_that_hold_each_term(
    service: RagService, data_dir: Path
) -> None:
    """What the extractive answerer weighs a question's terms by: the tenant's chunk count and,
    per term, how many chunks hold it, as the index keeps them (deleted chunks not counted)."""
    ids = ingest_notes(service)
    registry = Registry(f"sqlite:///{data_dir / 'registry.db'}", upgrade=False)
    try:
        asked = ["reader", "busy_timeout", "databas", "replication"]

        def expected(notes: dict[str, str]) -> dict[str, int]:
            held = {t: sum(t in set(terms(text)) for text in notes.values()) for t in asked}
            return {term: count for term, count in held.items() if count}

        found = registry.term_statistics(TENANT, asked)
        assert found.chunks == len(DATABASE_NOTES)
        assert (
            found.frequencies
            == expected(DATABASE_NOTES)
            == {
                "reader": 2,
                "busy_timeout": 1,
                "databas": 2,
            }
        )
        service.delete_document(TENANT, ids["busy"])
        found = registry.term_statistics(TENANT, asked)
        remaining = {k: v for k, v in DATABASE_NOTES.items() if k != "busy"}
        assert (found.chunks, found.frequencies) == (len(remaining), expected(remaining))
        assert registry.term_statistics("another-tenant", asked).frequencies == {}
    finally:
        registry.close()


def index_directly(registry: Registry, document_id: str, texts: list[str]) -> None:
    """Chunks into the lexical index alone (no vectors: this is the index's own behaviour)."""
    with registry.database.write() as session:
        lexical.index_chunks(
            session,
            TENANT,
            [
                Chunk(f"{document_id}-{i}", document_id, i, text, None, 0, len(text))
                for i, text in enumerate(texts)
            ],
        )


def test_a_narrow_scope_finds_its_chunks_below_the_tenants_best_postings(
    registry_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search reads only each term's best postings (POSTINGS_PER_TERM, lowered here so that
    a few chunks exceed it); a search scoped to documents whose postings rank below those
    still finds their chunks, with their exact BM25, on SQLite and PostgreSQL."""
    monkeypatch.setattr(lexical, "POSTINGS_PER_TERM", 10)
    registry = Registry(registry_url, upgrade=True)
    try:
        # Short chunks: the term's best postings. Long ones: its worst.
        popular = [f"zeppelin moored {i}" for i in range(30)]
        filler = " ".join(f"word{i}" for i in range(60))
        long = [f"zeppelin {filler} {i}" for i in range(3)]
        index_directly(registry, "doc_popular", popular)
        index_directly(registry, "doc_long", long)

        def search(**scope: Any) -> list[lexical.LexicalHit]:
            arguments = {"document_ids": None, "exclude_documents": (), "only_versions": {}}
            return registry.lexical_search(TENANT, "zeppelin", limit=50, **{**arguments, **scope})

        assert {hit.document_id for hit in search()} == {"doc_popular"}
        expected = {f"doc_long-{i}" for i in range(3)}
        for scope in (
            {"document_ids": {"doc_long"}},
            {"exclude_documents": {"doc_popular"}},
        ):
            hits = search(**scope)
            assert {hit.chunk_id for hit in hits} == expected, scope
            # Exact BM25: the term once in each chunk, every chunk holding it.
            lengths = [len(list(terms(text))) for text in popular + long]
            n, average = len(lengths), sum(lengths) / len(lengths)
            idf = math.log(1 + (n - n + 0.5) / (n + 0.5))
            bm25 = idf * 2.2 / (1 + 1.2 * (0.25 + 0.75 * lengths[-1] / average))
            assert [hit.score for hit in hits] == pytest.approx([bm25] * 3)
    finally:
        registry.close()
