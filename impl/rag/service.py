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
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import PurePath

from impl.errors import (
    ConfigurationError,
    Conflict,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    PreconditionRequired,
    RagapiError,
    ServiceUnavailable,
)
from impl.rag.answers import NO_ANSWER, AnswerProvider, AnswerStream, build_answer_provider
from impl.rag.chunking import Chunker
from impl.rag.documents import NewDocument, RetiredVersion, StoredObjects, check_precondition
from impl.rag.embeddings import (
    EmbeddingModel,
    build_embeddings,
    build_recorded_model,
    count_tokens,
    load_tokenizer,
)
from impl.rag.events import Event, JobEvents
from impl.rag.idempotency import RecordedResponse
from impl.rag.jobs import IngestWorkers, chunk_id, encode_extracted, recover_interrupted
from impl.rag.lexical import LexicalHit
from impl.rag.loaders import ExtractedText
from impl.rag.originals import Upload
from impl.rag.parsing import ParserProcesses
from impl.rag.reindex import SpaceMover
from impl.rag.spaces import Move, Space, TenantIndex
from impl.rag.store import DenseHit, admits, build_where, validate_metadata
from impl.rag.stores import Stores, build_stores
from impl.rag.types import (
    FINISHED_JOB_STATUSES,
    NO_OBSERVER,
    Answer,
    AnswerEvent,
    Chunk,
    Citation,
    Document,
    DocumentPatch,
    DocumentStatus,
    DoneEvent,
    IngestItem,
    Job,
    JobStatus,
    Metadata,
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

MAX_TOP_K = 50
MAX_PAGE_SIZE = 100
EVENT_PAGE_SIZE = 100  # events read from the log at a time
MAX_TITLE_CHARS = 300  # the contract's bound on a given title
# Hits of documents that are not ready (still indexing, being deleted) are excluded and the
# search repeated; each round excludes at least one more such document.
_SEARCH_ROUNDS = 4
MAX_DELETE_BATCH = 1000  # vector ids removed by one call
_ANSWER_MARGIN_SECONDS = 120.0  # an ingest's parsing and storing, beyond its wait for the job
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


def _name(number: int, item: IngestItem) -> str:
    """What an error about an item of a request calls it."""
    return item.filename or f"document {number}"


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
    options: RetrievalOptions, dense: list[DenseHit], lexical_hits: list[LexicalHit]
) -> list[_Ranked]:
    """The hits in the mode's order, each with its score and every signal's score and rank.
    Hybrid is weighted reciprocal-rank fusion: sum over signals of weight / (rrf_k + rank);
    ties go to the better dense rank, then the chunk id, so the order is stable."""
    explain: dict[str, dict[Signal, SignalScore]] = {}
    for rank, found in enumerate(dense, start=1):
        explain.setdefault(found.chunk_id, {})["dense"] = SignalScore(found.score, rank)
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


def _another_round_changes_nothing(
    options: RetrievalOptions,
    dense: list[DenseHit],
    lexical_hits: list[LexicalHit],
    *,
    more_dense: bool,
    more_lexical: bool,
    top_k: int,
) -> bool:
    """Whether the top_k that ``dense`` and ``lexical_hits`` fuse to is what a search that
    excludes the documents whose hits were just dropped from them would answer. That search
    finds the hits kept, in the same order, and where a list was full (``more_*``) up to as many
    more at its end. Each list falls in score, so in dense or lexical mode those come after every
    hit kept. In hybrid a chunk gains at most weight / (rrf_k + length + 1) from a full list it
    is not in: no such gain may lift a chunk past the one above it or into the top_k, and a
    chunk in neither list must stay out of it."""
    if options.mode != "hybrid":
        kept, more = (
            (dense, more_dense) if options.mode == "dense" else (lexical_hits, more_lexical)
        )
        return len(kept) >= top_k or not more
    gains: dict[Signal, float] = {
        "dense": options.dense_weight / (options.rrf_k + len(dense) + 1) if more_dense else 0.0,
        "lexical": (
            options.lexical_weight / (options.rrf_k + len(lexical_hits) + 1)
            if more_lexical
            else 0.0
        ),
    }
    ranked = _fuse(options, dense, lexical_hits)
    if len(ranked) < top_k:
        return not (more_dense or more_lexical)
    last = ranked[top_k - 1][1]
    if sum(gains.values()) >= last:  # a chunk in neither list
        return False
    for position, (_, score, signals) in enumerate(ranked):
        gain = sum(g for signal, g in gains.items() if signal not in signals)
        above = last if position >= top_k else ranked[position - 1][1] if position else math.inf
        if gain > 0 and score + gain >= above:
            return False
    return True


class RagService:
    def __init__(
        self,
        settings: Settings,
        embeddings: EmbeddingModel | None = None,
        observer: StageObserver = NO_OBSERVER,
        stores: Stores | None = None,
    ) -> None:
        """The service on ``stores`` (built from the settings' URLs by ``build_stores`` when
        not given); it closes them when it closes."""
        self._settings = settings
        self._observer = observer
        self._embeddings = embeddings or build_embeddings(settings)
        self._stores = stores or build_stores(
            settings, self._embeddings.model_id, self._embeddings.dimension
        )
        self._documents = self._stores.documents
        self._jobs = self._stores.jobs
        self._lexical = self._stores.lexical
        self._vectors = self._stores.vectors
        self._originals = self._stores.originals
        self._spaces = self._stores.spaces
        # Models of spaces the settings no longer name, loaded to answer until a move ends.
        self._earlier_models: dict[str, EmbeddingModel] = {}
        self._earlier_models_lock = threading.Lock()
        self._mover = SpaceMover(self._spaces, self._vectors, self._embeddings)
        # Held while a submission checks the queue's room and offers its job, so the check
        # stays true. (The originals store keeps a deletion from removing an upload's bytes,
        # across processes too.)
        self._ingest_lock = threading.Lock()
        # Held while a document's metadata is changed in the vector store and the registry,
        # and while a replacement (which carries the metadata on) is registered: in this
        # process the two stores never disagree for longer than one such change.
        self._document_lock = threading.Lock()
        with contextlib.ExitStack() as cleanup:
            # Whatever fails below closes the stores.
            cleanup.callback(self._stores.close)
            self._parsers = ParserProcesses(settings)
            self._answers: AnswerProvider = build_answer_provider(settings, self._embeddings)
            self._workers = IngestWorkers(
                registry=self._jobs,
                store=self._vectors,
                originals=self._originals,
                embeddings=self._embeddings,
                chunker=Chunker(
                    count_tokens=functools.partial(count_tokens, load_tokenizer()),
                    chunk_tokens=settings.chunk_tokens,
                    overlap_tokens=settings.chunk_overlap_tokens,
                ),
                cleanup=self,
                threads=settings.ingest_workers,
                queue_size=settings.ingest_queue_size,
                lease=timedelta(seconds=settings.job_lease_seconds),
                observer=observer,
            )
            cleanup.pop_all()
        self._lexical_threads = ThreadPoolExecutor(thread_name_prefix="lexical-search")
        # Searches beyond twice the cores' count wait here, in arrival order, instead of all
        # running at once: 32 searching threads contend for the GIL and the cores on every
        # step, which stretched the slowest requests to twice the median. Twice the cores,
        # not once: one search per core left the cores idle while searches waited on the
        # registry (a quarter less throughput, measured).
        self._search_slots = threading.Semaphore(
            settings.search_concurrency or 2 * (os.cpu_count() or 1)
        )
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
            self._jobs,
            self._vectors,
            self,
            every_running=self._settings.chroma_url is None,
            observer=self._observer,
        )
        for target in self._documents.being_deleted():
            self._finish_delete(target)
        for retired in self._documents.retired_versions():
            self.retire(retired)
        for tenant, document_id, version in self._documents.abandoned_replacements():
            self._vectors.delete_version(tenant, document_id, version)
            self.free(self._documents.drop_replacement(document_id, version))
        with self._ingest_lock:  # queues jobs: keeps submit_ingest's room check true
            self._workers.start()
        self._mover.resume()

    def close(self) -> None:
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._mover.stop(self._settings.worker_stop_seconds)
        self._workers.stop(self._settings.worker_stop_seconds)
        self._lexical_threads.shutdown(wait=True)
        self._stores.close()

    def start_parsers(self) -> None:
        """Ready the upload parsers now, so that the first upload does not wait for them (a
        process that serves the API; a ``ragapi worker`` never parses)."""
        self._parsers.start()

    def ingestion_alive(self) -> bool:
        """The ingestion threads and their lease heartbeat run (a worker's liveness)."""
        return self._workers.alive()

    def store_counts(self) -> StoreCounts:
        """Documents and jobs by status and chunks held, over every tenant (for metrics)."""
        return self._documents.counts()

    def probes(self) -> dict[str, Callable[[], None]]:
        """A readiness probe for each component the service uses: each returns when the
        component works and raises when it does not."""
        return {
            "registry": self._documents.ping,
            "vector_store": self._vectors.heartbeat,
            "originals": self._originals.check,
            "embeddings": self._check_embeddings,
        }

    def _check_embeddings(self) -> None:
        # A document, not a query: a remembered query vector would not reach the model.
        if len(self._embeddings.embed_documents(["ready"])[0]) != self._embeddings.dimension:
            raise RuntimeError("the embedding model returned a vector of the wrong width")

    # -- ingestion ----------------------------------------------------------------------------

    def idempotent_response(
        self, tenant: str, key: str, items: list[IngestItem]
    ) -> RecordedResponse | None:
        """Claim an Idempotency-Key for these items (None: answer, then record the response
        or release the key), or the response recorded for them."""
        fingerprint = hashlib.sha256()
        for item in items:
            described = [
                item.filename,
                item.title,
                item.declared_media_type,
                json.dumps(item.metadata, sort_keys=True),
                hashlib.sha256(item.content).hexdigest(),
            ]
            fingerprint.update(json.dumps(described).encode())
        ttl = timedelta(seconds=self._settings.idempotency_key_seconds)
        # A first request unanswered for longer than any answer takes died with its process.
        in_flight = timedelta(seconds=self._settings.ingest_wait_seconds + _ANSWER_MARGIN_SECONDS)
        return self._documents.claim_idempotency_key(
            tenant, key, fingerprint.hexdigest(), ttl=ttl, in_flight=in_flight
        )

    def record_idempotent_response(self, tenant: str, key: str, status: int, body: str) -> None:
        self._documents.record_response(tenant, key, status, body)

    def release_idempotency_key(self, tenant: str, key: str) -> None:
        self._documents.release_idempotency_key(tenant, key)

    def submit_ingest(self, tenant: str, items: list[IngestItem]) -> Job:
        if not items:
            raise InvalidInput("no documents were given")
        if len(items) > self._settings.max_files_per_request:
            raise InvalidInput(
                f"at most {self._settings.max_files_per_request} documents per request"
            )
        # Every item is checked before anything is stored: one bad file refuses the request.
        prepared = self._prepare(items)
        with self._ingest_lock:
            existing = self._documents.find_live(tenant, [p.sha256 for p in prepared])
            if any(p.sha256 not in existing for p in prepared) and not self._workers.has_room():
                raise ServiceUnavailable("the ingestion queue is full; try again shortly")
            with self._originals.upload() as upload:
                new_documents = [self._store_original(p, upload) for p in prepared]
                job = self._documents.register_ingest(tenant, new_documents, upload.contents)
            if job.status == "queued":
                # Room was checked under the same lock, and only submissions fill the queue.
                self._workers.offer(job.id)
        return job

    def _prepare(self, items: list[IngestItem]) -> list[_Prepared]:
        """Each item checked and read, in order; the first refused raises, naming its file."""
        for number, item in enumerate(items, start=1):
            try:
                if len(item.content) > self._settings.max_upload_bytes:
                    raise PayloadTooLarge(
                        f"larger than the {self._settings.max_upload_bytes} bytes accepted"
                    )
                validate_metadata(item.metadata)
            except RagapiError as exc:
                raise _naming(_name(number, item), exc) from exc
        prepared: list[_Prepared] = []
        for number, (item, outcome) in enumerate(
            zip(items, self._parsers.parse(items), strict=False), start=1
        ):
            if isinstance(outcome, RagapiError):
                raise _naming(_name(number, item), outcome) from outcome
            media_type, extracted = outcome
            prepared.append(
                _Prepared(
                    item=item,
                    media_type=media_type,
                    extracted=extracted,
                    sha256=hashlib.sha256(item.content).hexdigest(),
                    title=derive_title(item, extracted),
                )
            )
        return prepared

    @staticmethod
    def _store_original(prepared: _Prepared, upload: Upload) -> NewDocument:
        """The document to register, its bytes and extracted text put in ``upload``. Put even
        when the content looks like a duplicate: putting is a no-op for bytes already held,
        and the registry decides duplicates again in its own transaction."""
        original_key = upload.put(prepared.item.content)
        extracted_key = upload.put(encode_extracted(prepared.extracted))
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

    def replace_document(
        self,
        tenant: str,
        doc_id: str,
        item: IngestItem,
        *,
        metadata: Metadata | None,
        if_match: Sequence[str] | None,
    ) -> Job:
        """Register the next version of a document and queue its job; the current version
        answers until the job swaps the new one in. The same content is a job already
        succeeded. ``item.title`` and ``metadata``: None keeps the document's."""
        self._check_if_match_given(if_match)
        if metadata is not None:
            validate_metadata(metadata)
        (prepared,) = self._prepare([item])
        with self._document_lock, self._ingest_lock:
            if not self._workers.has_room():
                raise ServiceUnavailable("the ingestion queue is full; try again shortly")
            new: NewDocument | None = None
            try:
                with self._originals.upload() as upload:
                    new = self._store_original(prepared, upload)
                    job = self._documents.register_replacement(
                        tenant,
                        doc_id,
                        new,
                        title=prepared.title if item.title else None,
                        metadata=metadata,
                        if_match=if_match,
                        contents=upload.contents,
                    )
            except RagapiError:
                if new is not None:  # once the upload has ended: it kept its bytes till then
                    self.free((new.original_key, new.extracted_key))
                raise
            if job.status == "queued":
                self._workers.offer(job.id)
        return job

    def reindex_document(self, tenant: str, doc_id: str, *, if_match: Sequence[str] | None) -> Job:
        """Cut and embed the stored content again, under the current chunk settings and model,
        as a new version swapped in like a replacement (the current one answers until then)."""
        self._check_if_match_given(if_match)
        with self._document_lock, self._ingest_lock:
            if not self._workers.has_room():
                raise ServiceUnavailable("the ingestion queue is full; try again shortly")
            job = self._documents.register_replacement(
                tenant, doc_id, None, title=None, metadata=None, if_match=if_match
            )
            self._workers.offer(job.id)
        return job

    def reindex_tenant(self, tenant: str) -> TenantIndex:
        """Re-index every ready document of the tenant from its stored original, as one job
        of new versions each swapped in like a replacement (a document whose original is
        missing fails, the others go on). When the tenant's vectors are another model's than
        the configured one, they are moved to it instead (reindex.py), in the background:
        the old space answers until the switch."""
        current, writing = self._vectors.spaces(tenant)
        if not current.same_model(writing):
            move = self._spaces.begin_move(tenant, writing)
            self._mover.start(move)
            return TenantIndex(current=current, move=move, job=None)
        if self._spaces.move_of(tenant) is not None:
            # A move to a model the settings no longer name: what it filled goes.
            self._vectors.drop_other_spaces(tenant, current)
            self._spaces.finish_move(tenant)
        with self._ingest_lock:
            if not self._workers.has_room():
                raise ServiceUnavailable("the ingestion queue is full; try again shortly")
            job = self._documents.register_tenant_reindex(tenant)
            if job.status == "queued":
                self._workers.offer(job.id)
        return TenantIndex(current=current, move=None, job=job)

    def tenants(self) -> list[str]:
        """Every tenant that holds a document (the operator's re-index of them all)."""
        return self._spaces.tenants()

    def tenant_index(self, tenant: str) -> TenantIndex:
        """The space answering the tenant's searches and the move under way, if any."""
        return TenantIndex(
            current=self._spaces.current_space(tenant),
            move=self._spaces.move_of(tenant),
            job=None,
        )

    def move_tenant(self, tenant: str, progress: Callable[[Move], None]) -> Move | None:
        """The tenant's move to the configured model, run in this thread to its end (the
        operator's command): the move as it ended, or None when the tenant's vectors were that
        model's already. ServiceUnavailable when the service closed before the end."""
        current, writing = self._vectors.spaces(tenant)
        if current.same_model(writing):
            return None
        move = self._spaces.begin_move(tenant, writing)
        if not self._mover.run_here(move, progress):
            raise ServiceUnavailable("the move stopped before its end; run it again to resume")
        return move

    def _query_model(self, space: Space) -> EmbeddingModel:
        """The model that embeds questions for ``space``: the configured one, or during a move
        the one the space was built with."""
        if space.same_model(Space(self._embeddings.model_id, self._embeddings.dimension)):
            return self._embeddings
        with self._earlier_models_lock:
            model = self._earlier_models.get(space.model_id)
            if model is None:
                try:
                    model = build_recorded_model(space.model_id, space.dimension, self._settings)
                except ConfigurationError as exc:
                    raise ServiceUnavailable(exc.detail) from exc
                self._earlier_models[space.model_id] = model
            return model

    def patch_document(
        self,
        tenant: str,
        doc_id: str,
        patch: DocumentPatch,
        *,
        if_match: Sequence[str] | None,
    ) -> Document:
        """Apply a merge patch to the title and metadata. The vectors' metadata changes first,
        then the registry's (as ingestion writes them), so a filter never finds a document
        the registry would not admit; nothing is embedded again."""
        self._check_if_match_given(if_match)
        with self._document_lock:
            current = self.get_document(tenant, doc_id)
            check_precondition(current, if_match)
            if current.status == "pending":
                raise Conflict(f"document {doc_id} is still being indexed")
            # Checked before the vectors change: a replacement's vectors carry its own metadata.
            if self._documents.being_replaced(doc_id):
                raise Conflict(f"document {doc_id} is being replaced")
            metadata = {} if patch.clear_metadata else dict(current.metadata)
            for key, value in patch.metadata.items():
                if value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            validate_metadata(metadata)
            title = current.title if patch.title is None else _clean_title(patch.title)
            if not title:
                raise InvalidInput("the title is empty")
            moved = metadata != current.metadata
            if moved:
                self._vectors.set_metadata(tenant, doc_id, metadata)
            try:
                return self._documents.update_document(
                    tenant, doc_id, title=title, metadata=metadata, if_match=if_match
                )
            except BaseException:
                if moved:
                    self._vectors.set_metadata(tenant, doc_id, current.metadata)
                raise

    def _check_if_match_given(self, if_match: Sequence[str] | None) -> None:
        if if_match is None and self._settings.require_if_match:
            raise PreconditionRequired(
                "this server changes documents only with If-Match: send the ETag of the "
                "document as you last read it"
            )

    def retire(self, retired: RetiredVersion) -> None:
        """Remove a version a swap replaced: its vectors (by id), then the bytes no one uses."""
        ids = [
            chunk_id(retired.document_id, index, retired.version)
            for index in range(retired.chunk_count)
        ]
        for start in range(0, len(ids), MAX_DELETE_BATCH):
            self._vectors.delete_chunks(retired.tenant, ids[start : start + MAX_DELETE_BATCH])
        self.free(retired.keys)
        self._documents.forget_retired(retired.document_id, retired.version)

    def free(self, keys: Sequence[str]) -> None:
        """Delete the stored bytes of these keys that no document or replacement uses."""
        self._originals.discard(keys)

    def get_job(self, tenant: str, job_id: str) -> Job:
        job = self._jobs.get_job(tenant, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job

    def job_events(self, tenant: str, job_id: str, *, after: int) -> JobEvents:
        """The job's events after the event id ``after`` (a page of them)."""
        events = self._jobs.job_events(tenant, job_id, after=after, limit=EVENT_PAGE_SIZE)
        if events is None:
            raise NotFound(f"job {job_id} not found")
        return events

    def tenant_events(
        self,
        tenant: str,
        *,
        after: int,
        job_ids: Collection[str],
        documents: bool,
        up_to: int | None = None,
        limit: int = EVENT_PAGE_SIZE,
    ) -> list[Event]:
        """At most ``limit`` of the tenant's events after ``after`` (up to ``up_to``): those
        of ``job_ids``, and with ``documents`` every document event."""
        return self._jobs.tenant_events(
            tenant, after=after, job_ids=job_ids, documents=documents, limit=limit, up_to=up_to
        )

    def last_event_id(self) -> int:
        return self._jobs.last_event_id()

    def list_jobs(
        self, tenant: str, *, limit: int, cursor: str | None, status: JobStatus | None = None
    ) -> Page[Job]:
        self._check_limit(limit)
        return self._jobs.list_jobs(tenant, limit=limit, cursor=cursor, status=status)

    def cancel_job(self, tenant: str, job_id: str) -> Job:
        """A queued job is cancelled now; a running one is asked to stop at its next batch."""
        cancelled = self._jobs.cancel_job(tenant, job_id)
        if cancelled is None:
            raise NotFound(f"job {job_id} not found")
        job, failed, replacements = cancelled
        # A queued job may have run before (then interrupted): what it wrote goes too.
        if failed:
            self._vectors.delete_documents(tenant, failed)
        for document_id, version in replacements:
            self._vectors.delete_version(tenant, document_id, version)
            self.free(self._documents.drop_replacement(document_id, version))
        return job

    def wait_for_job(self, tenant: str, job_id: str, timeout_s: float) -> Job:
        """The job once finished, or as it stands when ``timeout_s`` has passed."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            job = self.get_job(tenant, job_id)
            remaining = deadline - time.monotonic()
            if job.status in FINISHED_JOB_STATUSES or remaining <= 0:
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
        return self._documents.list_documents(
            tenant,
            limit=limit,
            cursor=cursor,
            status=status,
            title_contains=title_contains,
            created_after=created_after,
            created_before=created_before,
        )

    def get_document(self, tenant: str, doc_id: str) -> Document:
        document = self._documents.get_document(tenant, doc_id)
        if document is None:
            raise NotFound(f"document {doc_id} not found")
        return document

    def list_chunks(
        self, tenant: str, doc_id: str, *, limit: int, cursor: str | None
    ) -> Page[Chunk]:
        self._check_limit(limit)
        page = self._documents.list_chunks(tenant, doc_id, limit=limit, cursor=cursor)
        if page is None:
            raise NotFound(f"document {doc_id} not found")
        return page

    def delete_document(
        self, tenant: str, doc_id: str, *, if_match: Sequence[str] | None = None
    ) -> None:
        """Mark, then remove vectors, stored bytes and rows, in that order: a crash in between
        leaves a document marked for deletion, which the next start finishes removing."""
        self._check_if_match_given(if_match)
        target = self._documents.mark_deleting(tenant, doc_id, if_match)
        if target is None:
            raise NotFound(f"document {doc_id} not found")
        self._finish_delete(target)

    def _finish_delete(self, target: StoredObjects) -> None:
        self._vectors.delete_documents(target.tenant, [target.document_id])
        self._originals.discard(target.keys, excluding=target.document_id)
        self._documents.delete_document_row(target)

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
        with self._search_slots:
            return self._search(tenant, query, top_k, filters, min_score, retrieval)

    def _search(
        self,
        tenant: str,
        query: str,
        top_k: int,
        filters: SearchFilters | None,
        min_score: float | None,
        retrieval: RetrievalOptions,
    ) -> list[SearchHit]:
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
        depth = top_k if retrieval.mode != "hybrid" else max(top_k, retrieval.candidates)
        scope = self._lexical_scope(tenant, filters) if retrieval.mode != "dense" else None

        # Documents some hit of which was of a version other than the current one (a
        # replacement being indexed, or one just swapped out): only the current one is asked for.
        only_versions: dict[str, int] = {}

        def lexical_search(excluded: frozenset[str], pinned: dict[str, int]) -> list[LexicalHit]:
            return self._lexical.lexical_search(
                tenant,
                query,
                limit=depth,
                document_ids=scope,
                exclude_documents=excluded,
                only_versions=pinned,
            )

        def start_lexical(excluded: frozenset[str]) -> Future[list[LexicalHit]]:
            """Hybrid's BM25 in a thread of its own, while this one embeds and queries Chroma:
            SQLite, onnxruntime and Chroma release the GIL while they work, so hybrid's latency
            is about the longer of the two retrievals instead of their sum. The other modes
            have nothing to overlap it with."""
            pinned = dict(only_versions)  # the thread's own copy
            if retrieval.mode == "hybrid":
                return self._lexical_threads.submit(lexical_search, excluded, pinned)
            done: Future[list[LexicalHit]] = Future()
            done.set_result(lexical_search(excluded, pinned) if retrieval.mode == "lexical" else [])
            return done

        excluded: frozenset[str] = frozenset()
        lexical = start_lexical(excluded)
        vector = None
        space = None
        if retrieval.mode != "lexical":
            # The space this process last read: the question is embedded by its model and
            # searched in its vectors alone, even if a move switches the tenant meanwhile,
            # unless the move has dropped them (below).
            space = self._vectors.search_space(tenant)
            vector = self._query_model(space).embed_query(query)
            self._observer.observe("embedding", time.perf_counter() - started)
        retrieving = time.perf_counter()
        # What a search that used every round on spaces other processes moved finds: nothing.
        lexical_hits: list[LexicalHit] = []
        current: dict[str, tuple[str, int]] = {}
        for _ in range(_SEARCH_ROUNDS):
            dense: list[DenseHit] = []
            if vector is not None:
                # Ids and scores: the texts of the hits kept come from the registry.
                dense = self._vectors.nearest(
                    tenant, vector, depth, filters, excluded, only_versions, space=space
                )
            if space is not None and not dense and self._vectors.search_space(tenant) != space:
                # The space's collection is gone: another process moved the tenant since this
                # one last read its space. The question is embedded again for the new one.
                space = self._vectors.search_space(tenant)
                vector = self._query_model(space).embed_query(query)
                continue
            lexical_hits = lexical.result()
            found = {(hit.document_id, hit.version) for hit in dense} | {
                (hit.document_id, hit.version) for hit in lexical_hits
            }
            # The documents searched in one version are asked about too, found or not: one
            # swapped since its version was read has that version's vectors removed, so it
            # would be found in neither and its next version never asked for.
            asked = {doc for doc, _ in found} | only_versions.keys()
            current = self._documents.ready_versions(tenant, list(asked))
            not_ready = {doc for doc, _ in found} - current.keys()
            stale = {
                doc: current[doc][1]
                for doc, version in [*found, *only_versions.items()]
                if doc in current and current[doc][1] != version
            }
            if all(only_versions.get(d) == v for d, v in stale.items()):
                if not not_ready:
                    break
                # A search finds chunks of documents still being indexed (one hybrid search in
                # twenty while two workers ingested: docs/benchmarks.md, "Worker scaling").
                # Dropping those hits is enough when another round could not change the
                # answer, and saves that round.
                dense_kept = [hit for hit in dense if hit.document_id not in not_ready]
                lexical_kept = [hit for hit in lexical_hits if hit.document_id not in not_ready]
                if _another_round_changes_nothing(
                    retrieval,
                    dense_kept,
                    lexical_kept,
                    more_dense=len(dense) == depth,
                    more_lexical=len(lexical_hits) == depth,
                    top_k=top_k,
                ):
                    dense, lexical_hits = dense_kept, lexical_kept
                    break
            excluded |= not_ready
            only_versions.update(stale)
            lexical = start_lexical(excluded)
        ranked = _fuse(retrieval, dense, lexical_hits)[:top_k]
        chunks = self._documents.get_chunks(tenant, [c for c, _, _ in ranked])
        self._observer.observe("retrieval", time.perf_counter() - retrieving)
        return [
            SearchHit(
                chunk=chunks[found_id],
                document_title=current[chunks[found_id].document_id][0],
                score=score,
                explain=explain,
            )
            for found_id, score, explain in ranked
            if found_id in chunks
            and current.get(chunks[found_id].document_id, ("", 0))[1] == chunks[found_id].version
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
        candidates = self._documents.ready_metadata(tenant, filters.document_ids)
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
        answer = (
            self._answers.stream(
                question, hits, functools.partial(self._lexical.term_statistics, tenant)
            )
            if hits
            else _nothing_found()
        )
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
