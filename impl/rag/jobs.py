"""Ingestion workers: threads that claim queued jobs from the registry, chunk and embed their
documents, and write vectors and chunk rows.

The registry is the source of truth, the in-process queue only a bounded wake-up call: a worker
claims a job with a conditional update and holds it under a lease it renews after every batch,
so a separate ``ragapi worker`` process could claim from the same registry. A job whose lease
ran out (its worker died) goes back to the queue, at most ``MAX_ATTEMPTS`` times.

Write order, so that a crash anywhere leaves nothing visible and nothing orphaned:
vectors first, then the chunk rows and progress (refused once the document's deletion began, in
which case the worker removes the vectors it just wrote), then the document becomes ready. A
re-run starts by removing whatever an earlier run of the same documents left behind.

A replacement (the next version of a ready document) is written the same way under its own
version, beside the current one, which searches keep finding (they take only each document's
current version). Complete, it is swapped in by one registry transaction, and only then are
the old version's vectors removed (the registry records the retired version until they are,
so a crash in between is finished at the next start).

A job asked to cancel stops at the next batch: the document it was indexing loses what was
written of it, those not reached fail as cancelled, those finished stay.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Protocol

from impl.errors import RagapiError, UnreadableDocument
from impl.rag.chunking import Chunker, ChunkSpan
from impl.rag.documents import RetiredVersion
from impl.rag.embeddings import EmbeddingModel
from impl.rag.job_queue import CANCELLED_DETAIL, ClaimedJob, DocumentWork, LeaseLost
from impl.rag.loaders import ExtractedText
from impl.rag.originals import OriginalStore
from impl.rag.registry import Registry
from impl.rag.store import VectorStore
from impl.rag.types import Chunk, JobError, StageObserver

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
INTERRUPTED_DETAIL = "interrupted too often"
LEASE = timedelta(minutes=10)
# Chunks embedded and written together: one progress update and lease renewal per batch, and
# the longest a shutdown waits for a worker (about a second with the packaged model).
EMBED_BATCH = 32
# How often an idle worker looks in the registry for jobs the in-process queue does not know
# (another process's, or more than the queue held at start-up), and for expired leases.
POLL_SECONDS = 2.0
RECLAIM_SECONDS = 60.0
_WAKE_UP = ""  # not a job id: put on the queue only to wake a worker at shutdown


def encode_extracted(extracted: ExtractedText) -> bytes:
    """The extracted text as stored beside the original, so a document is parsed only once."""
    payload = {"text": extracted.text, "page_starts": extracted.page_starts}
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def decode_extracted(data: bytes) -> ExtractedText:
    payload = json.loads(data)
    return ExtractedText(text=payload["text"], page_starts=payload["page_starts"])


def chunk_id(document_id: str, index: int, version: int = 1) -> str:
    """The same chunk of the same version always gets the same id, so a rewrite replaces it."""
    if version == 1:
        return f"{document_id}-{index}"
    return f"{document_id}-v{version}-{index}"


class VersionCleanup(Protocol):
    """What the service does once vectors and rows no longer need some stored bytes or a
    retired version's vectors (it holds the lock that keeps new documents' bytes safe)."""

    def retire(self, retired: RetiredVersion) -> None: ...

    def free(self, keys: Sequence[str]) -> None: ...


def recover_interrupted(
    registry: Registry, store: VectorStore, cleanup: VersionCleanup, *, every_running: bool
) -> None:
    """Queue again the running jobs no worker runs, or fail those out of attempts (their
    unfinished documents' vectors removed first, so a crash here is repaired next time)."""
    for job in registry.find_interrupted(every_running=every_running, max_attempts=MAX_ATTEMPTS):
        if job.gives_up:
            store.delete_documents(job.tenant, job.document_ids)
            for document_id, version in job.replacements:
                store.delete_version(job.tenant, document_id, version)
                cleanup.free(registry.drop_replacement(document_id, version))
            registry.give_up(
                job.job_id, job.document_ids, JobError("Ingestion interrupted", INTERRUPTED_DETAIL)
            )
            logger.warning("job %s failed: interrupted %d times", job.job_id, MAX_ATTEMPTS)
        else:
            registry.requeue(job.job_id)
            logger.info("job %s was interrupted; queued again", job.job_id)


class _Stopping(Exception):
    """The service is shutting down: leave the job for the next start."""


class _Cancelled(Exception):
    """The job was asked to cancel."""


class IngestWorkers:
    def __init__(
        self,
        *,
        registry: Registry,
        store: VectorStore,
        originals: OriginalStore,
        embeddings: EmbeddingModel,
        chunker: Chunker,
        cleanup: VersionCleanup,
        threads: int,
        queue_size: int,
        observer: StageObserver,
    ) -> None:
        self._observer = observer
        self._cleanup = cleanup
        self._registry = registry
        self._store = store
        self._originals = originals
        self._embeddings = embeddings
        self._chunker = chunker
        self._thread_count = threads
        self._queue: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        # Notified whenever a job finishes, so that waiters need not poll quickly.
        self._changed = threading.Condition()
        self._reclaim_lock = threading.Lock()
        self._next_reclaim = time.monotonic() + RECLAIM_SECONDS
        self._owner_prefix = f"{socket.gethostname()}/{os.getpid()}"

    def start(self) -> None:
        for job_id in self._registry.queued_job_ids(self._queue.maxsize):
            # Jobs beyond the queue's room stay queued in the registry: idle workers poll it.
            if not self.offer(job_id):
                break
        for number in range(self._thread_count):
            thread = threading.Thread(
                target=self._loop, name=f"ragapi-ingest-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float) -> None:
        """Stop promptly: a worker finishes its current batch, then gives its job back."""
        self._stopping.set()
        for _ in self._threads:
            # Wakes a worker waiting on the queue; a full queue wakes them all anyway.
            self.offer(_WAKE_UP)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                logger.warning("%s did not stop in time", thread.name)
        self._threads.clear()

    def has_room(self) -> bool:
        return not self._queue.full()

    def offer(self, job_id: str) -> bool:
        try:
            self._queue.put_nowait(job_id)
        except queue.Full:
            return False
        return True

    def wait_for_change(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def _loop(self) -> None:
        owner = f"{self._owner_prefix}/{uuid.uuid4().hex[:8]}"
        while not self._stopping.is_set():
            try:
                job_id: str | None = self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                job_id = None
            if self._stopping.is_set():
                return
            try:
                if job_id is None:
                    self._reclaim_expired()
                claimed = self._registry.claim_job(job_id, owner, LEASE)
                if claimed is not None:
                    self._run(claimed, owner)
            except Exception:
                # The job stays running under a lease that will expire; it is retried then.
                logger.exception("ingestion worker failed")
            finally:
                with self._changed:
                    self._changed.notify_all()

    def _reclaim_expired(self) -> None:
        with self._reclaim_lock:
            if time.monotonic() < self._next_reclaim:
                return
            self._next_reclaim = time.monotonic() + RECLAIM_SECONDS
        recover_interrupted(self._registry, self._store, self._cleanup, every_running=False)

    def _run(self, job: ClaimedJob, owner: str) -> None:
        logger.info("job %s: attempt %d", job.id, job.attempt)
        try:
            failures = self._index_job(job, owner)
        except _Stopping:
            self._registry.release_job(job.id, owner)
            logger.info("job %s given back at shutdown", job.id)
            return
        except _Cancelled:
            self._registry.finish_job(job.id, owner, None, cancelled=True)
            logger.info("job %s cancelled", job.id)
            return
        except LeaseLost:
            logger.warning("job %s: lease lost to another worker; abandoned", job.id)
            return
        error = None
        if failures:
            error = JobError(
                title="Ingestion failed",
                detail=f"{len(failures)} document(s) could not be indexed: {failures[0]}",
            )
        self._registry.finish_job(job.id, owner, error)
        logger.info("job %s %s", job.id, "failed" if error else "succeeded")

    def _index_job(self, job: ClaimedJob, owner: str) -> list[str]:
        """Index the job's pending documents; the reasons of those that failed."""
        work = self._registry.job_work(job.id)
        if job.attempt > 1:
            # What a crashed run wrote goes first, so the vectors end up exactly these. A first
            # attempt has nothing to clean: a run stopped at shutdown cleans up after itself.
            new = [document.id for document in work if not document.replacement]
            if new:
                self._store.delete_documents(work[0].tenant, new)  # one scan for them all
            for document in work:
                if document.replacement:
                    self._remove_vectors(document)
        if self._registry.cancel_requested(job.id):
            self._cancel(work)
        failures: list[str] = []
        planned: list[tuple[DocumentWork, list[ChunkSpan]]] = []
        for document in work:
            if self._stopping.is_set():
                raise _Stopping
            try:
                spans = self._chunk(document)
            except Exception as exc:
                self._fail(document, exc, failures)
                continue
            planned.append((document, spans))
            self._registry.renew_lease(job.id, owner, LEASE)
        self._registry.start_progress(
            job.id,
            owner,
            LEASE,
            total=sum(len(spans) for _, spans in planned),
            work=work,
        )
        for number, (document, spans) in enumerate(planned):
            try:
                self._index_document(job, owner, document, spans)
            except _Stopping:
                # The job goes back without counting an attempt: leave it no vectors to clean.
                self._remove_vectors(document)
                raise
            except _Cancelled:
                self._cancel([item for item, _ in planned[number:]])
            except LeaseLost:
                raise
            except Exception as exc:
                self._fail(document, exc, failures)
        return failures

    def _remove_vectors(self, document: DocumentWork) -> None:
        """What indexing this work may have written to the vector store."""
        if document.replacement:
            self._store.delete_version(document.tenant, document.id, document.version)
        else:
            self._store.delete_documents(document.tenant, [document.id])

    def _cancel(self, unfinished: Sequence[DocumentWork]) -> None:
        """Leave nothing of the unfinished work: new documents fail as cancelled, replacements
        are dropped (their documents keep the current version)."""
        for document in unfinished:
            self._remove_vectors(document)
            if document.replacement:
                self._cleanup.free(self._registry.drop_replacement(document.id, document.version))
            else:
                self._registry.mark_failed(document.id, CANCELLED_DETAIL)
        raise _Cancelled

    def _chunk(self, document: DocumentWork) -> list[ChunkSpan]:
        try:
            data = self._originals.get(document.extracted_key)
        except KeyError:
            raise UnreadableDocument("the stored copy of the document is missing") from None
        spans = self._chunker.split(decode_extracted(data))
        if not spans:
            raise UnreadableDocument("the document holds no text to index")
        return spans

    def _index_document(
        self, job: ClaimedJob, owner: str, document: DocumentWork, spans: Sequence[ChunkSpan]
    ) -> None:
        for start in range(0, len(spans), EMBED_BATCH):
            if self._stopping.is_set():
                raise _Stopping
            if self._registry.cancel_requested(job.id):
                raise _Cancelled
            chunks = [
                Chunk(
                    id=chunk_id(document.id, span.index, document.version),
                    document_id=document.id,
                    version=document.version,
                    index=span.index,
                    text=span.text,
                    page=span.page,
                    start_char=span.start_char,
                    end_char=span.end_char,
                )
                for span in spans[start : start + EMBED_BATCH]
            ]
            started = time.perf_counter()
            vectors = self._embeddings.embed_documents([chunk.text for chunk in chunks])
            self._observer.observe("embedding", time.perf_counter() - started)
            self._observer.chunks_embedded(len(chunks))
            if len(vectors) != len(chunks):
                raise RuntimeError(f"{len(vectors)} vectors for {len(chunks)} chunks")
            self._store.add(document.tenant, chunks, vectors, document.metadata)
            if not self._registry.add_chunks(job.id, owner, LEASE, document, chunks):
                # Its deletion began after our vectors were written, perhaps after the deleter
                # removed the document's vectors: remove ours, and count the rest as not due.
                self._remove_vectors(document)
                self._registry.skip_chunks(job.id, owner, LEASE, len(spans) - start)
                return
        ids = [chunk_id(document.id, span.index, document.version) for span in spans]
        stored = self._store.count(document.tenant, ids)
        if stored != len(spans):
            raise RuntimeError(f"the vector store holds {stored} of {len(spans)} vectors")
        if not document.replacement:
            # False means deletion began after the last batch was recorded; the deleter removes
            # every vector written so far, so nothing is left to do here.
            self._registry.mark_ready(document.id, len(spans))
            return
        retired = self._registry.swap_version(document.id, document.version)
        if retired is None:
            # The document was deleted meanwhile (its deleter removes every version's vectors).
            self._remove_vectors(document)
            return
        self._cleanup.retire(retired)

    def _fail(self, document: DocumentWork, exc: Exception, failures: list[str]) -> None:
        if isinstance(exc, RagapiError):
            reason = exc.detail
            logger.warning("document %s failed: %s", document.id, reason)
        else:
            # Internals stay in the log; the user gets a reason without them.
            reason = "an internal error stopped indexing"
            logger.exception("document %s failed", document.id)
        self._remove_vectors(document)
        if document.replacement:
            # The document keeps answering with its current version.
            self._cleanup.free(self._registry.drop_replacement(document.id, document.version))
            failures.append(reason)
        elif self._registry.mark_failed(document.id, reason):
            failures.append(reason)
