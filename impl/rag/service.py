"""RagService: the RAG stack behind the API and the CLI, called in-process.

Every method is synchronous and safe to call from many threads at once; the web layer calls
them from worker threads. Parsing is awaited in the caller's thread (so a bad file is refused
at once, naming the file) and done in a parser process of its own (parsing.py); chunking and
embedding happen in the ingestion workers (jobs.py).
``stream_answer`` is a generator: its work happens in next(), so pull it from a worker thread
too, and close() it when its reader goes away.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePath

from impl.errors import (
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    RagapiError,
    ServiceUnavailable,
)
from impl.rag.answers import NO_ANSWER, AnswerProvider, AnswerStream, build_answer_provider
from impl.rag.chunking import Chunker
from impl.rag.documents import NewDocument, StoredObjects
from impl.rag.embeddings import EmbeddingModel, build_embeddings, count_tokens, load_tokenizer
from impl.rag.jobs import IngestWorkers, encode_extracted, recover_interrupted
from impl.rag.lexical import LexicalHit
from impl.rag.loaders import ExtractedText
from impl.rag.originals import LocalOriginalStore
from impl.rag.parsing import ParserProcesses
from impl.rag.registry import Registry
from impl.rag.store import ScoredChunk, VectorStore, admits, build_where, validate_metadata
from impl.rag.types import (
    NO_OBSERVER,
    Answer,
    AnswerEvent,
    Chunk,
    Citation,
    Document,
    DocumentStatus,
    DoneEvent,
    IngestItem,
    Job,
    Page,
    RetrievalEvent,
    RetrievalOptions,
    SearchFilters,
    SearchHit,
    Signal,
    SignalScore,
    StageObserver,
    StoreCounts,
    Timings,
    TokenEvent,
)
from impl.settings import Settings

logger = logging.getLogger(__name__)

MAX_TOP_K = 50
MAX_PAGE_SIZE = 100
MAX_TITLE_CHARS = 300  # the contract's bound on a given title
# Hits of documents that are not ready (still indexing, being deleted) are excluded and the
# search repeated; each round excludes at least one more such document.
_SEARCH_ROUNDS = 4
_STOP_TIMEOUT_SECONDS = 15.0
_WAIT_SLICE_SECONDS = 0.5
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)


@dataclass(frozen=True)
class _Prepared:
    """One validated item: its text is extracted, so the worker never parses it again."""

    item: IngestItem
    media_type: str
    extracted: ExtractedText
    sha256: str
    title: str


def _nothing_found() -> AnswerStream:
    """The answer when no hit is left to answer from, shaped as a provider's stream."""
    yield NO_ANSWER
    return NO_ANSWER, []


def _token_events(answer: AnswerStream) -> Generator[TokenEvent, None, tuple[str, list[Citation]]]:
    """A provider's deltas as events, then its (text, citations). Closing this closes the
    provider's stream, which stops the generation."""
    with contextlib.closing(answer):
        while True:
            try:
                delta = next(answer)
            except StopIteration as end:
                result: tuple[str, list[Citation]] = end.value
                return result
            yield TokenEvent(delta)


def _naming(name: str, exc: RagapiError) -> RagapiError:
    """The same error, its detail prefixed with the file it is about."""
    detail = f"{name}: {exc.detail}"
    if isinstance(exc, InvalidInput):
        return type(exc)(detail, exc.errors)
    return type(exc)(detail)


def _clean_title(text: str) -> str:
    return " ".join(text.split())[:MAX_TITLE_CHARS].strip()


def derive_title(item: IngestItem, extracted: ExtractedText) -> str:
    """The given title; else the title the document gives itself (HTML's <title>, PDF or Word
    metadata, Markdown's first level-1 heading); else the file name without its extension; else
    the first Markdown heading; else the first line of text."""
    for candidate in (item.title, extracted.title, PurePath(item.filename or "").stem):
        if candidate and _clean_title(candidate):
            return _clean_title(candidate)
    heading = _HEADING.search(extracted.text)
    if heading:
        return _clean_title(heading.group(1))
    for line in extracted.text.splitlines():
        if line.strip():
            return _clean_title(line)
    return "Untitled"


DEFAULT_RETRIEVAL = RetrievalOptions()
MAX_CANDIDATES = 200
MAX_WEIGHT = 100.0
MAX_RRF_K = 1000
_Ranked = tuple[str, float, dict[Signal, SignalScore]]  # chunk id, score, explain


def _check_retrieval(options: RetrievalOptions) -> None:
    if options.mode not in ("dense", "lexical", "hybrid"):
        raise InvalidInput("retrieval mode must be dense, lexical or hybrid")
    weights = (options.dense_weight, options.lexical_weight)
    if not all(math.isfinite(w) and 0 <= w <= MAX_WEIGHT for w in weights):
        raise InvalidInput(f"retrieval weights must be between 0 and {MAX_WEIGHT:g}")
    if options.mode == "hybrid" and not any(weights):
        raise InvalidInput("hybrid retrieval needs a weight above 0")
    if not 1 <= options.rrf_k <= MAX_RRF_K:
        raise InvalidInput(f"rrf_k must be between 1 and {MAX_RRF_K}")
    if not 1 <= options.candidates <= MAX_CANDIDATES:
        raise InvalidInput(f"candidates must be between 1 and {MAX_CANDIDATES}")


def _fuse(
    options: RetrievalOptions, dense: list[ScoredChunk], lexical_hits: list[LexicalHit]
) -> list[_Ranked]:
    """The hits in the mode's order, each with its score and every signal's score and rank.
    Hybrid is weighted reciprocal-rank fusion: sum over signals of weight / (rrf_k + rank);
    ties go to the better dense rank, then the chunk id, so the order is stable."""
    explain: dict[str, dict[Signal, SignalScore]] = {}
    for rank, found in enumerate(dense, start=1):
        explain.setdefault(found.chunk.id, {})["dense"] = SignalScore(found.score, rank)
    for rank, hit in enumerate(lexical_hits, start=1):
        explain.setdefault(hit.chunk_id, {})["lexical"] = SignalScore(hit.score, rank)
    if options.mode != "hybrid":
        signal: Signal = options.mode
        return [(chunk_id, signals[signal].score, signals) for chunk_id, signals in explain.items()]
    weights: dict[Signal, float] = {
        "dense": options.dense_weight,
        "lexical": options.lexical_weight,
    }

    def fused(signals: dict[Signal, SignalScore]) -> float:
        return sum(weights[s] / (options.rrf_k + found.rank) for s, found in signals.items())

    ranked = [(chunk_id, fused(signals), signals) for chunk_id, signals in explain.items()]
    unranked = len(dense) + 1
    ranked.sort(key=lambda r: (-r[1], r[2]["dense"].rank if "dense" in r[2] else unranked, r[0]))
    return ranked


class RagService:
    def __init__(
        self,
        settings: Settings,
        embeddings: EmbeddingModel | None = None,
        observer: StageObserver = NO_OBSERVER,
    ) -> None:
        self._settings = settings
        self._observer = observer
        self._embeddings = embeddings or build_embeddings(settings)
        model_id, dimension = self._embeddings.model_id, self._embeddings.dimension
        with contextlib.ExitStack() as cleanup:
            # Whatever fails below closes what was already opened.
            self._registry = Registry(
                settings.resolved_registry_url, upgrade=settings.registry_upgrades_on_start
            )
            cleanup.callback(self._registry.close)
            self._registry.check_model(model_id, dimension)
            self._store = VectorStore(settings, model_id, dimension)
            cleanup.callback(self._store.close)
            self._originals = LocalOriginalStore(settings.data_dir / "originals")
            self._parsers = ParserProcesses(settings)
            self._answers: AnswerProvider = build_answer_provider(settings, self._embeddings)
            self._workers = IngestWorkers(
                registry=self._registry,
                store=self._store,
                originals=self._originals,
                embeddings=self._embeddings,
                chunker=Chunker(
                    count_tokens=functools.partial(count_tokens, load_tokenizer()),
                    chunk_tokens=settings.chunk_tokens,
                    overlap_tokens=settings.chunk_overlap_tokens,
                ),
                threads=settings.ingest_workers,
                queue_size=settings.ingest_queue_size,
                observer=observer,
            )
            cleanup.pop_all()
        # Held while originals are stored and registered, and while a deletion frees them, so
        # a deletion never removes bytes that a new document is about to reference.
        self._ingest_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._started = False
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Repair what a crash left half done, then start the ingestion workers."""
        with self._state_lock:
            if self._started:
                return
            self._started = True
        # With embedded Chroma no other process can be running jobs on this data, so every
        # running job is an interrupted one; with a server, only those whose lease expired.
        recover_interrupted(
            self._registry, self._store, every_running=self._settings.chroma_url is None
        )
        for target in self._registry.being_deleted():
            self._finish_delete(target)
        with self._ingest_lock:  # queues jobs: keeps submit_ingest's room check true
            self._workers.start()

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._workers.stop(_STOP_TIMEOUT_SECONDS)
        self._store.close()
        self._registry.close()

    def store_counts(self) -> StoreCounts:
        """Documents and jobs by status and chunks held, over every tenant (for metrics)."""
        return self._registry.counts()

    def readiness(self) -> dict[str, bool]:
        checks = {
            "registry": self._registry.ping,
            "vector_store": self._store.heartbeat,
            "embeddings": self._check_embeddings,
        }
        ready: dict[str, bool] = {}
        for name, check in checks.items():
            try:
                check()
            except Exception:
                logger.warning("readiness check %s failed", name, exc_info=True)
                ready[name] = False
            else:
                ready[name] = True
        return ready

    def _check_embeddings(self) -> None:
        # A document, not a query: a remembered query vector would not reach the model.
        if len(self._embeddings.embed_documents(["ready"])[0]) != self._embeddings.dimension:
            raise RuntimeError("the embedding model returned a vector of the wrong width")

    # -- ingestion ----------------------------------------------------------------------------

    def submit_ingest(self, tenant: str, items: list[IngestItem]) -> Job:
        if not items:
            raise InvalidInput("no documents were given")
        if len(items) > self._settings.max_files_per_request:
            raise InvalidInput(
                f"at most {self._settings.max_files_per_request} documents per request"
            )
        # Every item is checked before anything is stored: one bad file refuses the request.
        prepared = [self._prepare(number, item) for number, item in enumerate(items, start=1)]
        with self._ingest_lock:
            existing = self._registry.find_live(tenant, [p.sha256 for p in prepared])
            if any(p.sha256 not in existing for p in prepared) and not self._workers.has_room():
                raise ServiceUnavailable("the ingestion queue is full; try again shortly")
            new_documents = [self._store_original(p) for p in prepared]
            job = self._registry.register_ingest(tenant, new_documents)
            if job.status == "queued":
                # Room was checked under the same lock, and only submissions fill the queue.
                self._workers.offer(job.id)
        return job

    def _prepare(self, number: int, item: IngestItem) -> _Prepared:
        name = item.filename or f"document {number}"
        try:
            if len(item.content) > self._settings.max_upload_bytes:
                raise PayloadTooLarge(
                    f"larger than the {self._settings.max_upload_bytes} bytes accepted"
                )
            validate_metadata(item.metadata)
            media_type, extracted = self._parsers.parse(
                item.content, item.filename, item.declared_media_type
            )
        except RagapiError as exc:
            raise _naming(name, exc) from exc
        return _Prepared(
            item=item,
            media_type=media_type,
            extracted=extracted,
            sha256=hashlib.sha256(item.content).hexdigest(),
            title=derive_title(item, extracted),
        )

    def _store_original(self, prepared: _Prepared) -> NewDocument:
        # Stored even when the content looks like a duplicate: storing is a no-op for bytes
        # already held, and the registry decides duplicates again in its own transaction.
        original_key = self._originals.put(prepared.item.content)
        extracted_key = self._originals.put(encode_extracted(prepared.extracted))
        return NewDocument(
            sha256=prepared.sha256,
            title=prepared.title,
            filename=prepared.item.filename,
            media_type=prepared.media_type,
            size_bytes=len(prepared.item.content),
            original_key=original_key,
            extracted_key=extracted_key,
            metadata=dict(prepared.item.metadata),
        )

    def get_job(self, tenant: str, job_id: str) -> Job:
        job = self._registry.get_job(tenant, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def wait_for_job(self, tenant: str, job_id: str, timeout_s: float) -> Job:
        """The job once finished, or as it stands when ``timeout_s`` has passed."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            job = self.get_job(tenant, job_id)
            remaining = deadline - time.monotonic()
            if job.status in ("succeeded", "failed") or remaining <= 0:
                return job
            # Woken when a local worker finishes a job; the slice bounds the wait for one that
            # another process finishes.
            self._workers.wait_for_change(min(remaining, _WAIT_SLICE_SECONDS))

    # -- documents ----------------------------------------------------------------------------

    @staticmethod
    def _check_limit(limit: int) -> None:
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE_SIZE}")

    def list_documents(
        self,
        tenant: str,
        *,
        limit: int,
        cursor: str | None,
        status: DocumentStatus | None = None,
        title_contains: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> Page[Document]:
        self._check_limit(limit)
        for name, moment in (("created_after", created_after), ("created_before", created_before)):
            if moment is not None and moment.tzinfo is None:
                raise InvalidInput(f"{name} must carry a time zone")
        return self._registry.list_documents(
            tenant,
            limit=limit,
            cursor=cursor,
            status=status,
            title_contains=title_contains,
            created_after=created_after,
            created_before=created_before,
        )

    def get_document(self, tenant: str, doc_id: str) -> Document:
        document = self._registry.get_document(tenant, doc_id)
        if document is None:
            raise NotFound(f"document {doc_id} not found")
        return document

    def list_chunks(
        self, tenant: str, doc_id: str, *, limit: int, cursor: str | None
    ) -> Page[Chunk]:
        self._check_limit(limit)
        page = self._registry.list_chunks(tenant, doc_id, limit=limit, cursor=cursor)
        if page is None:
            raise NotFound(f"document {doc_id} not found")
        return page

    def delete_document(self, tenant: str, doc_id: str) -> None:
        """Mark, then remove vectors, stored bytes and rows, in that order: a crash in between
        leaves a document marked for deletion, which the next start finishes removing."""
        target = self._registry.mark_deleting(tenant, doc_id)
        if target is None:
            raise NotFound(f"document {doc_id} not found")
        self._finish_delete(target)

    def _finish_delete(self, target: StoredObjects) -> None:
        self._store.delete_documents(target.tenant, [target.document_id])
        with self._ingest_lock:
            in_use = self._registry.keys_in_use(target.keys, excluding=target.document_id)
            for key in set(target.keys) - in_use:
                self._originals.delete(key)
        self._registry.delete_document_row(target.document_id)

    # -- retrieval ----------------------------------------------------------------------------

    def search(
        self,
        tenant: str,
        query: str,
        *,
        top_k: int,
        filters: SearchFilters | None = None,
        min_score: float | None = None,
        retrieval: RetrievalOptions = DEFAULT_RETRIEVAL,
    ) -> list[SearchHit]:
        """The ``top_k`` best passages of the tenant's ready documents for ``query``, best
        first, as ``retrieval`` finds and orders them; ``min_score`` drops hits whose score
        (of the mode: cosine, BM25 or fused) is lower."""
        if not query.strip():
            raise InvalidInput("the query is empty")
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidInput(f"top_k must be between 1 and {MAX_TOP_K}")
        if min_score is not None and not math.isfinite(min_score):
            raise InvalidInput("min_score must be a finite number")
        _check_retrieval(retrieval)
        build_where(filters)  # refuses malformed filters in every mode
        if filters is not None and filters.document_ids is not None and not filters.document_ids:
            return []
        started = time.perf_counter()
        vector = None
        if retrieval.mode != "lexical":
            vector = self._embeddings.embed_query(query)
            self._observer.observe("embedding", time.perf_counter() - started)
        retrieving = time.perf_counter()
        depth = top_k if retrieval.mode != "hybrid" else max(top_k, retrieval.candidates)
        use_lexical = retrieval.mode != "dense"
        scope = self._lexical_scope(tenant, filters) if use_lexical else None
        excluded: set[str] = set()
        for _ in range(_SEARCH_ROUNDS):
            dense = []
            if vector is not None:
                dense = self._store.query(tenant, vector, depth, filters, excluded)
            lexical_hits = []
            if use_lexical:
                lexical_hits = self._registry.lexical_search(
                    tenant, query, limit=depth, document_ids=scope, exclude_documents=excluded
                )
            found = {hit.chunk.document_id for hit in dense} | {
                hit.document_id for hit in lexical_hits
            }
            titles = self._registry.ready_titles(tenant, list(found))
            not_ready = found - titles.keys()
            if not not_ready:
                break
            excluded |= not_ready
        ranked = _fuse(retrieval, dense, lexical_hits)[:top_k]
        chunks = {hit.chunk.id: hit.chunk for hit in dense}
        chunks.update(
            self._registry.get_chunks(tenant, [c for c, _, _ in ranked if c not in chunks])
        )
        self._observer.observe("retrieval", time.perf_counter() - retrieving)
        return [
            SearchHit(
                chunk=chunks[chunk_id],
                document_title=titles[chunks[chunk_id].document_id],
                score=score,
                explain=explain,
            )
            for chunk_id, score, explain in ranked
            if chunk_id in chunks
            and chunks[chunk_id].document_id in titles
            and (min_score is None or score >= min_score)
        ]

    def _lexical_scope(self, tenant: str, filters: SearchFilters | None) -> set[str] | None:
        """The documents the lexical index may return for these filters: None for all of the
        tenant's. The postings hold no metadata, so metadata conditions are evaluated on the
        registry's copy of each ready document's metadata."""
        if filters is None or not filters.metadata:
            return (
                None
                if filters is None or filters.document_ids is None
                else set(filters.document_ids)
            )
        candidates = self._registry.ready_metadata(tenant, filters.document_ids)
        return {doc_id for doc_id, metadata in candidates.items() if admits(filters, metadata)}

    def answer(
        self,
        tenant: str,
        question: str,
        *,
        top_k: int,
        filters: SearchFilters | None = None,
        min_score: float | None = None,
        retrieval: RetrievalOptions = DEFAULT_RETRIEVAL,
    ) -> Answer:
        """The whole answer at once: stream_answer, run to its end."""
        *_, done = self.stream_answer(
            tenant,
            question,
            top_k=top_k,
            filters=filters,
            min_score=min_score,
            retrieval=retrieval,
        )
        assert isinstance(done, DoneEvent)  # stream_answer always ends with one
        return done.answer

    def stream_answer(
        self,
        tenant: str,
        question: str,
        *,
        top_k: int,
        filters: SearchFilters | None = None,
        min_score: float | None = None,
        retrieval: RetrievalOptions = DEFAULT_RETRIEVAL,
    ) -> Generator[AnswerEvent, None, None]:
        """The answer as it is made: a RetrievalEvent, TokenEvents whose texts concatenate to
        the answer, then a DoneEvent with the answer, its citations and timings.

        Errors of the request (InvalidInput, ...) come from the first next(), before any event;
        a model that fails midway raises UpstreamError from a later next(). close() stops the
        generation. The timings are wall-clock, so they include the time the reader spends
        between events."""
        started = time.perf_counter()
        hits = self.search(
            tenant, question, top_k=top_k, filters=filters, min_score=min_score, retrieval=retrieval
        )
        retrieved = time.perf_counter()
        yield RetrievalEvent(hits)
        answer = self._answers.stream(question, hits) if hits else _nothing_found()
        text, citations = yield from _token_events(answer)
        finished = time.perf_counter()
        self._observer.observe("generation", finished - retrieved)
        yield DoneEvent(
            Answer(
                answer=text,
                citations=citations,
                provider=self._answers.name,
                # The provider decides whether a passage answers: one that cites nothing
                # found nothing.
                found=bool(citations),
                timings=Timings(
                    retrieval_ms=(retrieved - started) * 1000,
                    generation_ms=(finished - retrieved) * 1000,
                    total_ms=(finished - started) * 1000,
                ),
            )
        )
