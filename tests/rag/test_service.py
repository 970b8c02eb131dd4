"""RagService end to end with real parsers, the real packaged embedding model and real Chroma:
ingestion of every file type, ranking, duplicates, jobs, pagination, filters, deletion, tenancy
and the model identity check."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import chromadb
import pytest
from sqlalchemy import create_engine, text

from impl.errors import (
    ConfigurationError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnreadableDocument,
    UnsupportedMediaType,
)
from impl.rag.embeddings import EmbeddingModel
from impl.rag.service import NO_ANSWER, RagService
from impl.rag.spaces import Move
from impl.rag.store import DenseHit, chroma_settings, collection_name
from impl.rag.stores import VectorIndex, build_stores
from impl.rag.types import (
    Document,
    IngestItem,
    Job,
    MetadataRange,
    RetrievalOptions,
    SearchFilters,
)
from tests.documents import (
    CORPUS,
    make_corrupt_pdf,
    make_docx,
    make_html,
    make_markdown,
    make_pdf,
    make_png,
    make_text,
)
from tests.rag.conftest import (
    ServiceFactory,
    ingest,
    make_settings,
    text_item,
    vector_metadata,
)

TENANT = "acme"
OTHER = "globex"
# Every guarantee of search (tenancy, filters, readiness, deletion) holds in every mode.
MODES = [RetrievalOptions(mode=mode) for mode in ("dense", "lexical", "hybrid")]
every_mode = pytest.mark.parametrize("retrieval", MODES, ids=lambda r: r.mode)
DENSE = RetrievalOptions(mode="dense")
LEXICAL = RetrievalOptions(mode="lexical")

# One corpus document per file type, so every type is indexed and ranked end to end.
FORMATS = {
    "rust": ("rust.pdf", "application/pdf"),
    "sourdough": (
        "sourdough.docx",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ),
    "saturn": ("saturn.html", "text/html"),
    "french_revolution": ("revolution.md", "text/markdown"),
    "photosynthesis": ("photosynthesis.txt", "text/plain"),
}


def corpus_item(key: str, year: int) -> IngestItem:
    doc = CORPUS[key]
    filename, _ = FORMATS[key]
    content = {
        "rust": lambda: make_pdf([doc.paragraphs[0], "\n\n".join(doc.paragraphs[1:])]),
        "sourdough": lambda: make_docx(doc.paragraphs),
        "saturn": lambda: make_html(doc.title, doc.paragraphs),
        "french_revolution": lambda: make_markdown(doc.title, doc.paragraphs),
        "photosynthesis": lambda: make_text(doc.paragraphs),
    }[key]()
    return IngestItem(
        content=content,
        filename=filename,
        title=doc.title,
        metadata={"topic": key, "year": year, "science": key in ("saturn", "photosynthesis")},
    )


def long_text(sentences: int, subject: str = "warehouse") -> str:
    return " ".join(
        f"Sentence {i} records that crate {i} of the {subject} holds {i * 7 % 13} widgets."
        for i in range(sentences)
    )


class Corpus:
    def __init__(self, service: RagService, data_dir: Path, job: Job) -> None:
        self.service = service
        self.data_dir = data_dir
        self.job = job
        self.ids = dict(zip(FORMATS, job.document_ids, strict=True))


@pytest.fixture(scope="module")
def corpus(
    tmp_path_factory: pytest.TempPathFactory, embeddings: EmbeddingModel
) -> Iterator[Corpus]:
    """The five CORPUS documents, one per file type, indexed once for the read-only tests."""
    data_dir = tmp_path_factory.mktemp("corpus") / "data"
    service = RagService(make_settings(data_dir), embeddings)
    service.start()
    items = [corpus_item(key, 2020 + n) for n, key in enumerate(FORMATS)]
    job = ingest(service, TENANT, items)
    yield Corpus(service, data_dir, job)
    service.close()


# -- read-only tests on the corpus -------------------------------------------------------------


def test_every_file_type_is_indexed(corpus: Corpus) -> None:
    service = corpus.service
    for key, (filename, media_type) in FORMATS.items():
        document = service.get_document(TENANT, corpus.ids[key])
        assert (document.status, document.media_type, document.filename) == (
            "ready",
            media_type,
            filename,
        )
        assert document.title == CORPUS[key].title
        assert document.error is None and document.chunk_count > 0
        chunks = service.list_chunks(TENANT, document.id, limit=100, cursor=None).items
        assert [chunk.index for chunk in chunks] == list(range(document.chunk_count))
        # Chroma itself holds exactly one vector per chunk row, with the chunk's ids.
        stored = vector_metadata(corpus.data_dir, TENANT, document.id)
        assert sorted(stored) == sorted(chunk.id for chunk in chunks)
        assert CORPUS[key].answer in " ".join(chunk.text for chunk in chunks)
        for chunk in chunks:
            assert chunk.page == (1 if key == "rust" else None)
            assert 0 <= chunk.start_char < chunk.end_char
    job = service.get_job(TENANT, corpus.job.id)
    assert (
        job.chunks_done
        == job.chunks_total
        == sum(service.get_document(TENANT, doc_id).chunk_count for doc_id in corpus.ids.values())
    )


@every_mode
def test_each_question_ranks_its_document_first(
    corpus: Corpus, retrieval: RetrievalOptions
) -> None:
    for key, doc in CORPUS.items():
        hits = corpus.service.search(TENANT, doc.question, top_k=5, retrieval=retrieval)
        assert hits[0].chunk.document_id == corpus.ids[key], (key, hits[0])
        assert hits[0].document_title == doc.title
        assert hits == sorted(hits, key=lambda hit: hit.score, reverse=True)


def test_answers_cite_the_right_document(corpus: Corpus) -> None:
    answer = corpus.service.answer(TENANT, CORPUS["saturn"].question, top_k=3)
    assert answer.found and answer.provider == "extractive"
    assert answer.citations and answer.citations[0].document_id == corpus.ids["saturn"]
    assert CORPUS["saturn"].answer in answer.answer
    timings = answer.timings
    assert 0 < timings.retrieval_ms <= timings.total_ms
    assert timings.generation_ms <= timings.total_ms


def test_an_unanswerable_question_says_so(corpus: Corpus) -> None:
    answer = corpus.service.answer(
        TENANT, "What is the airspeed of an unladen swallow?", top_k=3, min_score=0.9
    )
    assert not answer.found
    assert answer.answer == NO_ANSWER
    assert answer.citations == []
    assert answer.timings.generation_ms < answer.timings.total_ms


@every_mode
def test_min_score_drops_weak_hits(corpus: Corpus, retrieval: RetrievalOptions) -> None:
    question = f"{CORPUS['rust'].question} saturn sourdough revolution photosynthesis"
    hits = corpus.service.search(TENANT, question, top_k=10, retrieval=retrieval)
    cut = hits[1].score
    kept = corpus.service.search(TENANT, question, top_k=10, min_score=cut, retrieval=retrieval)
    assert kept == [hit for hit in hits if hit.score >= cut]


@every_mode
def test_search_filters(corpus: Corpus, retrieval: RetrievalOptions) -> None:
    def found(filters: SearchFilters) -> set[str]:
        # Words of every document, so each mode finds each one unless a filter drops it.
        hits = corpus.service.search(
            TENANT,
            "rust saturn sourdough revolution photosynthesis history science",
            top_k=50,
            filters=filters,
            retrieval=retrieval,
        )
        ids = {hit.chunk.document_id for hit in hits}
        return {key for key, doc_id in corpus.ids.items() if doc_id in ids}

    assert found(SearchFilters(metadata={"topic": "saturn"})) == {"saturn"}
    assert found(SearchFilters(metadata={"science": True})) == {"saturn", "photosynthesis"}
    assert found(SearchFilters(metadata={"topic": ["rust", "sourdough", "nope"]})) == {
        "rust",
        "sourdough",
    }
    # Years are 2020 (rust) to 2024 (photosynthesis), in FORMATS order.
    assert found(SearchFilters(metadata={"year": MetadataRange(gte=2022, lt=2024)})) == {
        "saturn",
        "french_revolution",
    }
    assert found(SearchFilters(metadata={"year": MetadataRange(gt=2023.5)})) == {"photosynthesis"}
    ids_filter = SearchFilters(
        document_ids=[corpus.ids["rust"], corpus.ids["saturn"]],
        metadata={"science": False},
    )
    assert found(ids_filter) == {"rust"}
    assert found(SearchFilters(metadata={"year": 2021})) == {"sourdough"}
    assert found(SearchFilters(metadata={"year": "2021"})) == set()  # a string is no number
    assert found(SearchFilters(metadata={"science": 1})) == set()  # nor a number a boolean


def test_invalid_searches_are_refused(corpus: Corpus) -> None:
    service = corpus.service
    for kwargs in (
        {"top_k": 0},
        {"top_k": 51},
        {"top_k": 5, "min_score": float("nan")},
        {"top_k": 5, "retrieval": RetrievalOptions(mode="fuzzy")},  # type: ignore[arg-type]
        {"top_k": 5, "retrieval": RetrievalOptions(dense_weight=0, lexical_weight=0)},
        {"top_k": 5, "retrieval": RetrievalOptions(dense_weight=-1)},
        {"top_k": 5, "retrieval": RetrievalOptions(rrf_k=0)},
        {"top_k": 5, "retrieval": RetrievalOptions(candidates=201)},
    ):
        with pytest.raises(InvalidInput):
            service.search(TENANT, "bread", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        service.search(TENANT, "   ", top_k=5)
    with pytest.raises(InvalidInput, match="range"):
        service.search(TENANT, "x", top_k=5, filters=SearchFilters(metadata={"y": MetadataRange()}))


def test_searches_beyond_the_concurrency_limit_wait_their_turn(
    make_service: ServiceFactory,
) -> None:
    """With one search at a time, searches from many threads in every mode (a refused one
    among them) all finish with the answers a lone search gets: a refused search gives its
    turn back, and hybrid's BM25 thread does not wait on the turn its own search holds."""
    service = make_service(search_concurrency=1)
    ingest(service, TENANT, [text_item(long_text(40), title="Warehouse")])
    expected = {
        r.mode: [hit.chunk.id for hit in service.search(TENANT, "crate 7", top_k=3, retrieval=r)]
        for r in MODES
    }
    found: list[tuple[str, list[str]]] = []

    def search(retrieval: RetrievalOptions) -> None:
        with pytest.raises(InvalidInput):
            service.search(TENANT, " ", top_k=3)
        hits = service.search(TENANT, "crate 7", top_k=3, retrieval=retrieval)
        found.append((retrieval.mode, [hit.chunk.id for hit in hits]))

    threads = [threading.Thread(target=search, args=(r,)) for r in MODES * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert sorted(found) == sorted((r.mode, expected[r.mode]) for r in MODES * 4)


def test_tenants_are_isolated(corpus: Corpus) -> None:
    service = corpus.service
    doc_id = corpus.ids["saturn"]
    for retrieval in MODES:
        assert service.search(OTHER, CORPUS["saturn"].question, top_k=50, retrieval=retrieval) == []
    assert not service.answer(OTHER, CORPUS["saturn"].question, top_k=5).found
    assert service.list_documents(OTHER, limit=100, cursor=None).items == []
    unknown = "doc_does_not_exist"
    calls = [
        lambda d: service.get_document(OTHER, d),
        lambda d: service.list_chunks(OTHER, d, limit=5, cursor=None),
        lambda d: service.delete_document(OTHER, d),
    ]
    for call in calls:
        # Another tenant's document and a missing one are told apart by nothing.
        with pytest.raises(NotFound) as theirs:
            call(doc_id)
        with pytest.raises(NotFound) as missing:
            call(unknown)
        assert theirs.value.detail == f"document {doc_id} not found"
        assert missing.value.detail == f"document {unknown} not found"
    with pytest.raises(NotFound, match="job"):
        service.get_job(OTHER, corpus.job.id)
    # The other tenant's failed delete left the document whole.
    assert service.get_document(TENANT, doc_id).status == "ready"
    assert len(vector_metadata(corpus.data_dir, TENANT, doc_id)) > 0


def test_readiness_probes_every_component(corpus: Corpus) -> None:
    probes = corpus.service.probes()
    assert set(probes) == {"registry", "vector_store", "originals", "embeddings"}
    for probe in probes.values():
        probe()  # raises when its component is down


# -- tests that change what is stored ------------------------------------------------------------


def test_duplicates_embed_nothing(service: RagService, data_dir: Path) -> None:
    first = ingest(service, TENANT, [text_item(long_text(20), filename="a.txt")])
    [doc_id] = first.document_ids
    vectors = vector_metadata(data_dir, TENANT)
    again = service.submit_ingest(
        TENANT,
        [text_item(long_text(20), filename="copy.txt"), text_item(long_text(20))],
    )
    assert again.status == "succeeded"
    assert again.document_ids == again.duplicate_document_ids == [doc_id]
    assert (again.chunks_done, again.chunks_total) == (0, 0)
    assert vector_metadata(data_dir, TENANT) == vectors
    assert [d.id for d in service.list_documents(TENANT, limit=10, cursor=None).items] == [doc_id]
    # A mix of new and duplicate content indexes only the new.
    mixed = ingest(service, TENANT, [text_item(long_text(20)), text_item("Fresh words here.")])
    assert mixed.duplicate_document_ids == [doc_id]
    assert len(mixed.document_ids) == 2
    new_id = mixed.document_ids[1]
    assert mixed.chunks_total == service.get_document(TENANT, new_id).chunk_count
    assert len(vector_metadata(data_dir, TENANT)) == len(vectors) + mixed.chunks_total


def test_job_lifecycle_and_progress(make_service: ServiceFactory) -> None:
    # Small chunks: many batches of cheap embeddings, so the running state can be watched.
    settings = {"chunk_tokens": 32, "chunk_overlap_tokens": 0}
    stopped = make_service(start=False, **settings)
    job = stopped.submit_ingest(TENANT, [text_item(long_text(200))])
    assert (job.status, job.chunks_done, job.chunks_total) == ("queued", 0, 0)
    assert job.error is None and job.duplicate_document_ids == []
    assert stopped.get_document(TENANT, job.document_ids[0]).status == "pending"
    waited = stopped.wait_for_job(TENANT, job.id, timeout_s=0.3)
    assert waited.status == "queued"
    stopped.close()

    service = make_service(**settings)
    seen: list[tuple[str, int, int]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = service.get_job(TENANT, job.id)
        seen.append((current.status, current.chunks_done, current.chunks_total))
        if current.status in ("succeeded", "failed"):
            break
        time.sleep(0.02)
    final = service.get_job(TENANT, job.id)
    assert final.status == "succeeded", final
    assert final.chunks_total > 3 * 32  # several embedding batches
    assert final.chunks_done == final.chunks_total
    assert final.updated_at > final.created_at
    running = [progress for progress in seen if progress[0] == "running"]
    assert running, seen
    assert any(0 < done < total for _, done, total in running), seen
    done_counts = [done for _, done, _ in seen]
    assert done_counts == sorted(done_counts)
    document = service.get_document(TENANT, job.document_ids[0])
    assert (document.status, document.chunk_count) == ("ready", final.chunks_total)


def test_a_bad_file_refuses_the_whole_request(make_service: ServiceFactory, data_dir: Path) -> None:
    service = make_service(max_upload_bytes=4096)
    good = text_item("A perfectly good note.", filename="good.txt")
    cases = [
        (IngestItem(make_corrupt_pdf(), "broken.pdf", None, {}), UnreadableDocument),
        (IngestItem(make_png(), "photo.png", None, {}), UnsupportedMediaType),
        (IngestItem(b"   \n", "empty.txt", None, {}), UnreadableDocument),
        (IngestItem(b"x" * 5000, "huge.txt", None, {}), PayloadTooLarge),
        (IngestItem(b"Some text.", "meta.txt", None, {"bad key": 1}), InvalidInput),
    ]
    for bad, error in cases:
        with pytest.raises(error) as caught:
            service.submit_ingest(TENANT, [good, bad])
        assert caught.value.detail.startswith(f"{bad.filename}: ")
    with pytest.raises(UnsupportedMediaType, match=r"^document 2: "):
        service.submit_ingest(TENANT, [good, IngestItem(make_png(), None, None, {})])
    with pytest.raises(InvalidInput):
        service.submit_ingest(TENANT, [])
    assert service.list_documents(TENANT, limit=10, cursor=None).items == []
    assert not [path for path in (data_dir / "originals").rglob("*") if path.is_file()]


def test_a_full_queue_refuses_new_work(make_service: ServiceFactory) -> None:
    service = make_service(start=False, ingest_queue_size=1)
    first = service.submit_ingest(TENANT, [text_item("The first note.")])
    with pytest.raises(ServiceUnavailable):
        service.submit_ingest(TENANT, [text_item("The second note.")])
    assert [d.id for d in service.list_documents(TENANT, limit=10, cursor=None).items] == [
        first.document_ids[0]
    ]
    # Nothing to index, nothing queued: a duplicate is still answered.
    duplicate = service.submit_ingest(TENANT, [text_item("The first note.")])
    assert duplicate.status == "succeeded"


def test_listing_pages_and_filters(service: RagService) -> None:
    titles = ["Alpha report", "Beta memo", "Gamma REPORT", "Delta note", "Epsilon", "Zeta report"]
    for title in titles:
        ingest(service, TENANT, [text_item(f"The {title} says hello.", title=title)])
    ingest(service, TENANT, [text_item("The last one.", title="Omega report")])

    def pages(limit: int, **filters: object) -> list[list[Document]]:
        out, cursor = [], None
        while True:
            page = service.list_documents(TENANT, limit=limit, cursor=cursor, **filters)  # type: ignore[arg-type]
            out.append(page.items)
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    every = [doc for page in pages(3) for doc in page]
    assert [len(page) for page in pages(3)] == [3, 3, 1]
    assert len({doc.id for doc in every}) == 7
    keys = [(doc.created_at, doc.id) for doc in every]
    assert keys == sorted(keys, reverse=True)
    reports = [doc.title for page in pages(2, title_contains="rePort") for doc in page]
    assert reports == ["Omega report", "Zeta report", "Gamma REPORT", "Alpha report"]
    assert pages(3, status="pending") == [[]]
    middle = every[3].created_at
    newer = [doc.id for page in pages(2, created_after=middle) for doc in page]
    assert newer == [doc.id for doc in every[:3]]
    older = [doc.id for page in pages(2, created_before=middle, status="ready") for doc in page]
    assert older == [doc.id for doc in every[4:]]
    for cursor in ("garbage!", "eyJ4IjogMX0"):
        with pytest.raises(InvalidInput, match="cursor"):
            service.list_documents(TENANT, limit=3, cursor=cursor)
    for limit in (0, 101):
        with pytest.raises(InvalidInput, match="limit"):
            service.list_documents(TENANT, limit=limit, cursor=None)


def test_chunks_page_in_order(make_service: ServiceFactory) -> None:
    service = make_service(chunk_tokens=32, chunk_overlap_tokens=0)
    job = ingest(service, TENANT, [text_item(long_text(30))])
    [doc_id] = job.document_ids
    indexes, cursor = [], None
    while True:
        page = service.list_chunks(TENANT, doc_id, limit=4, cursor=cursor)
        indexes.extend(chunk.index for chunk in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert indexes == list(range(service.get_document(TENANT, doc_id).chunk_count))
    assert len(indexes) > 4
    with pytest.raises(InvalidInput, match="cursor"):
        service.list_chunks(TENANT, doc_id, limit=4, cursor="bm9wZQ")


def test_pdf_chunks_carry_their_page(make_service: ServiceFactory) -> None:
    service = make_service(chunk_tokens=32, chunk_overlap_tokens=0)
    pages = [long_text(6, f"{name} depot") for name in ("north", "south", "east")]
    job = ingest(service, TENANT, [IngestItem(make_pdf(pages), "depots.pdf", None, {})])
    chunks = service.list_chunks(TENANT, job.document_ids[0], limit=100, cursor=None).items
    chunk_pages = [chunk.page for chunk in chunks]
    assert chunk_pages == sorted(chunk_pages)  # type: ignore[type-var]
    assert set(chunk_pages) == {1, 2, 3}
    for chunk in chunks:
        name = ("north", "south", "east")[chunk.page - 1]  # type: ignore[operator]
        assert f"{name} depot" in chunk.text


def test_delete_removes_vectors_chunks_and_original(service: RagService, data_dir: Path) -> None:
    saturn, bread = CORPUS["saturn"], CORPUS["sourdough"]
    job = ingest(
        service,
        TENANT,
        [
            text_item("\n\n".join(saturn.paragraphs), title=saturn.title),
            text_item("\n\n".join(bread.paragraphs), title=bread.title),
        ],
    )
    saturn_id, bread_id = job.document_ids
    # The other tenant holds the same bytes: the stored original is shared.
    ingest(service, OTHER, [text_item("\n\n".join(saturn.paragraphs))])
    stored_before = {p for p in (data_dir / "originals").rglob("*") if p.is_file()}

    service.delete_document(TENANT, saturn_id)

    assert vector_metadata(data_dir, TENANT, saturn_id) == {}
    assert len(vector_metadata(data_dir, TENANT, bread_id)) > 0
    with pytest.raises(NotFound):
        service.get_document(TENANT, saturn_id)
    with pytest.raises(NotFound):
        service.list_chunks(TENANT, saturn_id, limit=5, cursor=None)
    with pytest.raises(NotFound):
        service.delete_document(TENANT, saturn_id)
    for retrieval in MODES:
        question = f"Titan {saturn.question} bread"
        hits = service.search(TENANT, question, top_k=50, retrieval=retrieval)
        assert hits and all(hit.chunk.document_id == bread_id for hit in hits), retrieval
        assert not any("Titan" in hit.chunk.text for hit in hits)
    assert [d.id for d in service.list_documents(TENANT, limit=10, cursor=None).items] == [bread_id]
    assert {p for p in (data_dir / "originals").rglob("*") if p.is_file()} == stored_before
    assert service.search(OTHER, saturn.question, top_k=1)

    service.delete_document(TENANT, bread_id)
    remaining = {p for p in (data_dir / "originals").rglob("*") if p.is_file()}
    assert len(remaining) == len(stored_before) - 2  # the bread's original and extracted text
    assert vector_metadata(data_dir, TENANT) == {}


def test_delete_while_indexing_leaves_no_vectors(
    make_service: ServiceFactory, data_dir: Path
) -> None:
    service = make_service(chunk_tokens=32, chunk_overlap_tokens=0)
    job = service.submit_ingest(TENANT, [text_item(long_text(300))])
    [doc_id] = job.document_ids
    deadline = time.monotonic() + 60
    while service.get_job(TENANT, job.id).chunks_done == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    service.delete_document(TENANT, doc_id)
    finished = service.wait_for_job(TENANT, job.id, 120)
    assert finished.status == "succeeded"
    assert finished.chunks_done == finished.chunks_total
    assert vector_metadata(data_dir, TENANT, doc_id) == {}
    with pytest.raises(NotFound):
        service.get_document(TENANT, doc_id)


def test_a_missing_stored_text_fails_the_job(make_service: ServiceFactory, data_dir: Path) -> None:
    stopped = make_service(start=False)
    job = stopped.submit_ingest(TENANT, [text_item("Gone before it was indexed.")])
    stopped.close()
    for path in (data_dir / "originals").rglob("*"):
        if path.is_file():
            path.unlink()
    service = make_service()
    finished = service.wait_for_job(TENANT, job.id, 60)
    assert finished.status == "failed"
    assert finished.error is not None and finished.error.title == "Ingestion failed"
    assert "missing" in finished.error.detail
    document = service.get_document(TENANT, job.document_ids[0])
    assert document.status == "failed" and document.error
    assert vector_metadata(data_dir, TENANT) == {}
    # A failed document does not count as held: the same file can be sent again.
    retry = service.submit_ingest(TENANT, [text_item("Gone before it was indexed.")])
    assert retry.duplicate_document_ids == []


def test_titles_are_derived_when_not_given(service: RagService) -> None:
    job = service.submit_ingest(
        TENANT,
        [
            text_item("Body text one.", title="  Given   title "),
            text_item("Body text two.", filename="quarterly_report.v2.txt"),
            text_item("Intro line\n\n# The Heading\n\nText.", filename=None),
            text_item("\n\n  First line wins  \nsecond line"),
        ],
    )
    titles = [service.get_document(TENANT, doc_id).title for doc_id in job.document_ids]
    assert titles == ["Given title", "quarterly_report.v2", "The Heading", "First line wins"]


def test_a_document_s_own_title_comes_before_its_file_name(service: RagService) -> None:
    saturn = CORPUS["saturn"]
    files = [
        (make_html("The  moons of\nSaturn", saturn.paragraphs), "page.html"),
        (make_pdf(saturn.paragraphs, title="Saturn survey 2024"), "scan_0042.pdf"),
        (make_docx(saturn.paragraphs, title="Notes on Saturn"), "Document1.docx"),
        (make_markdown("Saturn's rings", saturn.paragraphs), "README.md"),
        (make_pdf(saturn.paragraphs[:1]), "untitled-export.pdf"),
    ]
    items = [IngestItem(content, name, None, {}) for content, name in files]
    job = service.submit_ingest(TENANT, items)
    titles = [service.get_document(TENANT, doc_id).title for doc_id in job.document_ids]
    assert titles == [
        "The moons of Saturn",
        "Saturn survey 2024",
        "Notes on Saturn",
        "Saturn's rings",
        "untitled-export",  # no title of its own: the file name
    ]


class _OtherModel(EmbeddingModel):
    """The real model under another name: as if the server were configured differently."""

    def __init__(self, inner: EmbeddingModel) -> None:
        self._inner = inner
        self.model_id = "another-model"

    @property
    def dimension(self) -> int:
        return self._inner.dimension

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self._inner.embed_query(text)


def _tenant_collections(data_dir: Path, tenant: str) -> dict[str, tuple[str, int]]:
    """Chroma's own view: the tenant's collections by name, with the model and the number of
    vectors each holds."""
    client = chromadb.PersistentClient(path=str(data_dir / "chroma"), settings=chroma_settings())
    try:
        found = {}
        for collection in client.list_collections():
            meta = collection.metadata or {}
            if collection.name == collection_name(tenant) or meta.get("ragapi_tenant") == (
                collection_name(tenant).removeprefix("ragapi-tenant-")
            ):
                found[collection.name] = (str(meta["ragapi_model_id"]), collection.count())
        return found
    finally:
        client.close()


def test_a_model_change_keeps_answering_until_the_reindex_moves_the_index(
    service: RagService, data_dir: Path, embeddings: EmbeddingModel
) -> None:
    job = ingest(
        service,
        TENANT,
        [text_item("Sourdough starter is fed with flour and water."), text_item(long_text(40))],
    )
    chunks = sum(service.get_document(TENANT, d).chunk_count for d in job.document_ids)
    service.close()
    settings = make_settings(data_dir)
    other = RagService(settings, _OtherModel(embeddings))
    other.start()
    try:
        # The index still holds the packaged model's vectors: they answer, questions embedded
        # by the model the registry recorded for them.
        [hit] = other.search(TENANT, "feeding a sourdough starter", top_k=1)
        assert "flour" in hit.chunk.text
        index = other.tenant_index(TENANT)
        assert index.current.model_id == embeddings.model_id
        assert index.move is None
        moves: list[Move] = []
        moved = other.move_tenant(TENANT, moves.append)
        assert moved is not None and moved.target.model_id == "another-model"
        assert moves[-1].chunks_done == moves[-1].chunks_total == chunks
        assert other.tenant_index(TENANT).current.model_id == "another-model"
        assert other.tenant_index(TENANT).move is None
        # One collection is left, of the new model, with every chunk.
        assert list(_tenant_collections(data_dir, TENANT).values()) == [("another-model", chunks)]
        [hit] = other.search(TENANT, "feeding a sourdough starter", top_k=1)
        assert "flour" in hit.chunk.text
        # A document ingested now goes into the new model's collection.
        ingest(other, TENANT, [text_item("Rye bread needs a longer proof.")])
        [hit] = other.search(TENANT, "rye proofing", top_k=1, retrieval=DENSE)
        assert "Rye" in hit.chunk.text
    finally:
        other.close()
    # Back on the packaged model: "another-model" cannot be loaded to answer meanwhile.
    back = RagService(settings, embeddings)
    back.start()
    try:
        with pytest.raises(ServiceUnavailable, match="ragapi reindex"):
            back.search(TENANT, "sourdough", top_k=1, retrieval=DENSE)
        assert back.search(TENANT, "sourdough", top_k=1, retrieval=LEXICAL)
        assert back.move_tenant(TENANT, lambda move: None) is not None
        [hit] = back.search(TENANT, "feeding a sourdough starter", top_k=1, retrieval=DENSE)
        assert "flour" in hit.chunk.text
        [(model_id, count)] = _tenant_collections(data_dir, TENANT).values()
        assert (model_id, count) == (embeddings.model_id, chunks + 1)
        assert back.move_tenant(TENANT, lambda move: None) is None  # nothing left to move
    finally:
        back.close()


def test_a_tenant_without_vectors_of_the_old_model_is_on_the_new_one_at_once(
    service: RagService, data_dir: Path, embeddings: EmbeddingModel
) -> None:
    ingest(service, TENANT, [text_item("Indexed with the packaged model.")])
    service.close()
    # The registry's first model is the packaged one; a server on another model now.
    other = RagService(make_settings(data_dir), _OtherModel(embeddings))
    other.start()
    try:
        assert other.search(OTHER, "anything", top_k=1, retrieval=DENSE) == []
        assert other.tenant_index(OTHER).current.model_id == "another-model"
        ingest(other, OTHER, [text_item("Globex ships widgets by the crate.")])
        [hit] = other.search(OTHER, "widget shipping", top_k=1, retrieval=DENSE)
        assert "widgets" in hit.chunk.text
        assert other.tenant_index(TENANT).current.model_id == embeddings.model_id
    finally:
        other.close()


def test_a_move_stopped_midway_answers_from_the_old_index_and_resumes_at_the_next_start(
    service: RagService, data_dir: Path, embeddings: EmbeddingModel
) -> None:
    texts = [f"Tide table {i}: high water at the pier comes {i} minutes late." for i in range(20)]
    ingest(service, TENANT, [text_item(text) for text in texts])
    service.close()
    settings = make_settings(data_dir)
    other = RagService(settings, _OtherModel(embeddings))
    other.start()
    index = other.reindex_tenant(TENANT)  # the move runs in the background
    assert index.job is None and index.move is not None
    other.close()  # stops it at its next document, as a shutdown does
    # The old index is whole; the new collection holds at most part of the chunks.
    held = dict(_tenant_collections(data_dir, TENANT).values())
    assert held[embeddings.model_id] == 20
    assert held.get("another-model", 0) < 20
    restarted = RagService(settings, _OtherModel(embeddings))
    try:
        before = restarted.tenant_index(TENANT)
        assert before.current.model_id == embeddings.model_id, "stopped before the switch"
        assert before.move is not None and before.move.target.model_id == "another-model"
        [hit] = restarted.search(TENANT, "high water at the pier, 7 minutes", top_k=1)
        assert "Tide table" in hit.chunk.text  # answered from the old index
        restarted.start()  # resumes the move
        deadline = time.monotonic() + 120
        while restarted.tenant_index(TENANT).move is not None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert restarted.tenant_index(TENANT).current.model_id == "another-model"
        assert list(_tenant_collections(data_dir, TENANT).values()) == [("another-model", 20)]
        [hit] = restarted.search(TENANT, "high water at the pier, 7 minutes", top_k=1)
        assert "Tide table" in hit.chunk.text
    finally:
        restarted.close()


def test_inconsistent_chunk_settings_stop_start_up(
    data_dir: Path, embeddings: EmbeddingModel
) -> None:
    # The default overlap (30 tokens) does not fit in 16-token chunks.
    with pytest.raises(ConfigurationError, match="overlap"):
        RagService(make_settings(data_dir, chunk_tokens=16), embeddings)
    # Nothing was left open that would stand in the way of a correct configuration.
    RagService(make_settings(data_dir, chunk_tokens=16, chunk_overlap_tokens=4), embeddings).close()


@every_mode
def test_documents_being_indexed_never_appear_in_search(
    make_service: ServiceFactory, retrieval: RetrievalOptions
) -> None:
    service = make_service(chunk_tokens=32, chunk_overlap_tokens=0)
    ready = ingest(service, TENANT, [text_item("A small note about crates in a warehouse.")])
    job = service.submit_ingest(TENANT, [text_item(long_text(300))])
    deadline = time.monotonic() + 60
    while service.get_job(TENANT, job.id).chunks_done == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # The pending document's chunks are the nearest: they are excluded, and the search is
    # repeated without them, so the ready document still fills the result.
    question = "which crate of the warehouse holds widgets"
    hits = service.search(TENANT, question, top_k=3, retrieval=retrieval)
    assert service.get_job(TENANT, job.id).status == "running"
    assert [hit.chunk.document_id for hit in hits] == ready.document_ids
    service.wait_for_job(TENANT, job.id, 120)
    hits = service.search(TENANT, question, top_k=3, retrieval=retrieval)
    assert job.document_ids[0] in {hit.chunk.document_id for hit in hits}


def test_ingest_search_and_delete_on_postgresql(
    make_service: ServiceFactory, postgres_url: str
) -> None:
    """The registry and the lexical index in PostgreSQL: every retrieval mode finds what was
    ingested, and a deletion removes it from every one and from the database."""
    service = make_service(registry_url=postgres_url, registry_auto_upgrade=True)
    saturn, bread = CORPUS["saturn"], CORPUS["sourdough"]
    job = ingest(
        service,
        TENANT,
        [
            text_item("\n\n".join(saturn.paragraphs), title=saturn.title),
            text_item("\n\n".join(bread.paragraphs), title=bread.title),
        ],
    )
    saturn_id, bread_id = job.document_ids
    for retrieval in MODES:
        hits = service.search(TENANT, saturn.question, top_k=3, retrieval=retrieval)
        assert hits and hits[0].chunk.document_id == saturn_id, retrieval

    service.delete_document(TENANT, saturn_id)

    for retrieval in MODES:
        question = f"Titan {saturn.question} bread"
        hits = service.search(TENANT, question, top_k=50, retrieval=retrieval)
        assert hits and all(hit.chunk.document_id == bread_id for hit in hits), retrieval
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            held = connection.execute(text("SELECT DISTINCT document_id FROM chunks")).scalars()
            indexed = connection.execute(
                text("SELECT DISTINCT document_id FROM lexical_postings")
            ).scalars()
            assert set(held) == set(indexed) == {bread_id}
    finally:
        engine.dispose()


@every_mode
def test_integers_past_64_bits_are_stored_and_filtered_as_the_same_number(
    service: RagService, retrieval: RetrievalOptions
) -> None:
    big = 10**30  # JSON has no integer limit; Chroma refuses integers past 64 bits
    job = ingest(service, TENANT, [text_item("Crates of widgets.", metadata={"serial": big})])

    def found(condition: object) -> bool:
        filters = SearchFilters(metadata={"serial": condition})  # type: ignore[dict-item]
        hits = service.search(TENANT, "widgets", top_k=5, filters=filters, retrieval=retrieval)
        return [hit.chunk.document_id for hit in hits] == job.document_ids

    assert found(big) and found([big, "other"]) and found(MetadataRange(gte=big))
    assert not found(2 * big) and not found(MetadataRange(gt=big))


class RecordingIndex:
    """The real vector index, with the tenants it was queried for recorded."""

    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        self.queried: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.index, name)

    def nearest(self, tenant: str, *args: Any, **kwargs: Any) -> list[DenseHit]:
        self.queried.append(tenant)
        return self.index.nearest(tenant, *args, **kwargs)


def test_the_service_works_on_the_stores_it_is_given(
    data_dir: Path, embeddings: EmbeddingModel
) -> None:
    settings = make_settings(data_dir)
    stores = build_stores(settings, embeddings.model_id, embeddings.dimension)
    recording = RecordingIndex(stores.vectors)
    given = dataclasses.replace(stores, vectors=recording)
    service = RagService(settings, embeddings, stores=given)
    try:
        service.start()
        job = ingest(service, TENANT, [text_item("Lamps are polished with vinegar.")])
        [doc_id] = job.document_ids
        hits = service.search(
            TENANT, "polishing lamps", top_k=1, retrieval=RetrievalOptions(mode="dense")
        )
    finally:
        service.close()
    assert [hit.chunk.document_id for hit in hits] == [doc_id]
    assert recording.queried == [TENANT]


def test_a_jobs_small_documents_reach_the_vector_store_in_one_write_each_with_its_metadata(
    data_dir: Path, embeddings: EmbeddingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Chroma write costs its server about the same however few vectors it holds, so the
    small documents of a job are embedded and written together; each still gets its own
    metadata and is found alone by it."""
    service = RagService(make_settings(data_dir), embeddings)
    writes: list[set[str]] = []
    add = service._vectors.add

    def recording_add(tenant: str, chunks: Any, *args: Any, **kwargs: Any) -> None:
        writes.append({chunk.document_id for chunk in chunks})
        add(tenant, chunks, *args, **kwargs)

    monkeypatch.setattr(service._vectors, "add", recording_add)
    topics = ["lighthouses", "beekeeping", "glassblowing", "falconry", "origami", "tides"]
    items = [
        text_item(f"A short note on {topic}: {topic} is practised by few.", metadata={"n": n})
        for n, topic in enumerate(topics)
    ]
    try:
        service.start()
        job = ingest(service, TENANT, items)
        assert writes == [set(job.document_ids)]
        for n, (topic, doc_id) in enumerate(zip(topics, job.document_ids, strict=True)):
            assert service.get_document(TENANT, doc_id).status == "ready"
            hits = service.search(
                TENANT,
                topic,
                top_k=3,
                filters=SearchFilters(metadata={"n": n}),
                retrieval=RetrievalOptions(mode="dense"),
            )
            assert [hit.chunk.document_id for hit in hits] == [doc_id]
            assert topic in hits[0].chunk.text
    finally:
        service.close()


def test_a_search_that_pinned_the_version_swapped_out_meanwhile_finds_the_next_one(
    service: RagService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving a replacement makes possible, forced: a search finds both versions'
    vectors while the next is indexed, reads that the first is current and searches it alone;
    before that second query the next version is swapped in and the first's vectors removed.
    The search must then find the document in its new version, not in neither."""
    winter = "Harbour pilot notices: in winter the tugs wait inside the breakwater."
    summer = "Harbour pilot notices: in summer the tugs wait outside the breakwater."
    document_id = ingest(service, TENANT, [text_item(winter)]).document_ids[0]
    at_swap, release_swap, swapped = threading.Event(), threading.Event(), threading.Event()
    swap_version = service._jobs.swap_version  # the seam the race goes through

    def held_swap(*args: Any, **kwargs: Any) -> Any:
        at_swap.set()
        release_swap.wait(120)
        try:
            return swap_version(*args, **kwargs)
        finally:
            swapped.set()

    monkeypatch.setattr(service._jobs, "swap_version", held_swap)
    nearest = service._vectors.nearest
    calls: list[dict[str, int]] = []

    def racing_nearest(*args: Any, **kwargs: Any) -> Any:
        only_versions = dict(args[5])
        calls.append(only_versions)
        if only_versions == {document_id: 1}:
            # The search has pinned the old version: now the swap happens, and the old
            # version's vectors go, before this query runs.
            release_swap.set()
            assert swapped.wait(120)
            deadline = time.monotonic() + 60
            while service.get_job(TENANT, job.id).status != "succeeded":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        return nearest(*args, **kwargs)

    job = service.replace_document(
        TENANT, document_id, text_item(summer), metadata=None, if_match=None
    )
    assert at_swap.wait(120)  # both versions' vectors are written: the job waits to swap
    monkeypatch.setattr(service._vectors, "nearest", racing_nearest)
    hits = service.search(
        TENANT, "where do the tugs wait", top_k=3, retrieval=RetrievalOptions(mode="dense")
    )
    assert {document_id: 1} in calls  # the interleaving did happen
    assert [(hit.chunk.document_id, hit.chunk.version) for hit in hits] == [(document_id, 2)]
    assert "summer" in hits[0].chunk.text
