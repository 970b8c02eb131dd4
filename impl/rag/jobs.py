"""Ingestion workers: threads that claim queued jobs from the registry, chunk and embed their
documents, and write vectors and chunk rows.

The registry is the source of truth, the in-process queue only a bounded wake-up call: a worker
claims a job (a conditional update; FOR UPDATE SKIP LOCKED on PostgreSQL) and holds it under a
short lease that a heartbeat thread renews, whatever the job is doing, so a slow batch keeps it
and a dead process loses it quickly. Any process may claim: the server's threads, or
``ragapi worker`` processes on other machines. A job whose lease ran out (its worker died) goes
back to the queue, at most ``MAX_ATTEMPTS`` times.

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

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, TypeVar

from impl.errors import DependencyUnavailable, RagapiError, UnreadableDocument
from impl.rag.chunking import Chunker, ChunkSpan
from impl.rag.documents import RetiredVersion
from impl.rag.embeddings import EmbeddingModel
from impl.rag.job_queue import CANCELLED_DETAIL, ClaimedJob, DocumentWork, LeaseLost
from impl.rag.loaders import ExtractedText
from impl.rag.originals import OriginalStore
from impl.rag.stores import JobQueue, VectorIndex
from impl.rag.types import NO_OBSERVER, Chunk, JobError, StageObserver

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
INTERRUPTED_DETAIL = "interrupted too often"
# Chunks embedded and written together: one progress update per batch, and the longest a
# shutdown waits for a worker (about a second with the packaged model).
EMBED_BATCH = 32
# How often an idle worker looks in the registry for jobs the in-process queue does not know
# (another process's, or more than the queue held at start-up): the longest such a job waits
# for an idle worker. A look is one indexed read, 0.4 ms of CPU (on SQLite it takes no write
# lock); at 2 s a one-worker run of scripts/bench --scaling waited 1.75 s of its 32 s for it.
POLL_SECONDS = 0.5
# Heartbeats per lease: a lease survives a missed beat or two (a registry that answers slowly).
BEATS_PER_LEASE = 4
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
    registry: JobQueue,
    store: VectorIndex,
    cleanup: VersionCleanup,
    *,
    every_running: bool,
    observer: StageObserver = NO_OBSERVER,
) -> list[str]:
    """Queue again the running jobs no worker runs, or fail those out of attempts (their
    unfinished documents' vectors removed first, so a crash here is repaired next time).
    The ids of the jobs queued again."""
    requeued = []
    for job in registry.find_interrupted(every_running=every_running, max_attempts=MAX_ATTEMPTS):
        facts = {"job_id": job.job_id, "previous_owner": job.lease_owner}
        if job.gives_up:
            store.delete_documents(job.tenant, job.document_ids)
            for document_id, version in job.replacements:
                store.delete_version(job.tenant, document_id, version)
                cleanup.free(registry.drop_replacement(document_id, version))
            registry.give_up(
                job.job_id, job.document_ids, JobError("Ingestion interrupted", INTERRUPTED_DETAIL)
            )
            observer.ingest_job("given_up")
            logger.warning(
                "job %s given up: interrupted %d times (last worker %s)",
                job.job_id,
                MAX_ATTEMPTS,
                job.lease_owner,
                extra=facts,
            )
        elif registry.requeue(job.job_id, job.lease_owner):
            requeued.append(job.job_id)
            observer.ingest_job("reclaimed")
            logger.warning(
                "job %s reclaimed: its worker %s stopped renewing its lease; queued again",
                job.job_id,
                job.lease_owner,
                extra=facts,
            )
    return requeued


class _Stopping(Exception):
    """The service is shutting down: leave the job for the next start."""


class _Held:
    """The jobs this process runs, by id with their lease owner, and those whose lease the
    heartbeat found taken: the running thread abandons such a job at its next batch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owners: dict[str, str] = {}
        self.lost: set[str] = set()

    def add(self, job_id: str, owner: str) -> None:
        with self.lock:
            self.owners[job_id] = owner
            self.lost.discard(job_id)

    def remove(self, job_id: str) -> None:
        with self.lock:
            self.owners.pop(job_id, None)
            self.lost.discard(job_id)

    def snapshot(self) -> dict[str, str]:
        with self.lock:
            return dict(self.owners)

    def mark_lost(self, job_id: str) -> None:
        with self.lock:
            self.lost.add(job_id)

    def is_lost(self, job_id: str) -> bool:
        with self.lock:
            return job_id in self.lost


class _Cancelled(Exception):
    """The job was asked to cancel."""


@dataclass(frozen=True)
class _LastBatch:
    """A document's last batch of chunks: written, then the document is complete."""

    document: DocumentWork
    chunks: Sequence[Chunk]
    spans: Sequence[ChunkSpan]  # all of the document's


@dataclass
class _Finishing:
    """Documents' last writes and completions, running while the next document is embedded."""

    job: ClaimedJob
    owner: str
    batches: Sequence[_LastBatch]
    future: Future[list[bool]]  # each document's: False when its deletion began first
    settled: bool = False  # its outcome dealt with


_Item = TypeVar("_Item")


def shared_batches(documents: Sequence[_Item], size: Callable[[_Item], int]) -> list[list[_Item]]:
    """The documents in order, consecutive small ones together up to EMBED_BATCH chunks
    (``size``: a document's), a larger one alone. Documents of a batch are embedded in one
    call and written to the vector store in one request: a Chroma write costs its server 10-20
    ms of CPU however few vectors it holds, which made a job of two-chunk documents spend 5.6
    ms of Chroma's CPU a chunk (docs/benchmarks.md, "Worker scaling")."""
    batches: list[list[_Item]] = []
    room = 0  # chunks the last batch can still take
    for document in documents:
        chunks = size(document)
        if chunks > room or not batches:
            batches.append([])
            room = EMBED_BATCH
        batches[-1].append(document)
        room -= chunks
    return batches


def _chunks(document: DocumentWork, spans: Sequence[ChunkSpan]) -> list[Chunk]:
    return [
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
        for span in spans
    ]


class IngestWorkers:
    def __init__(
        self,
        *,
        registry: JobQueue,
        store: VectorIndex,
        originals: OriginalStore,
        embeddings: EmbeddingModel,
        chunker: Chunker,
        cleanup: VersionCleanup,
        threads: int,
        queue_size: int,
        lease: timedelta,
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
        self._lease = lease
        self._queue_size = queue_size
        self._queue: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._held = _Held()
        self._heartbeat: threading.Thread | None = None
        self._heartbeat_stop = threading.Event()
        # Notified whenever a job finishes, so that waiters need not poll quickly.
        self._changed = threading.Condition()
        self._owner_prefix = f"{socket.gethostname()}/{os.getpid()}"

    def start(self) -> None:
        if self._thread_count == 0:
            return  # this process only queues: other processes run the jobs
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
        self._heartbeat = threading.Thread(
            target=self._beat, name="ragapi-ingest-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def stop(self, timeout: float) -> None:
        """Stop within ``timeout``: a worker finishes its current batch, then gives its job
        back; a job whose worker is still busy then is queued again (counted as an attempt, so
        that its next run first removes what this one wrote)."""
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
        self._heartbeat_stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout)
        for job_id, owner in self._held.snapshot().items():
            self._held.mark_lost(job_id)  # its thread, if it ever wakes, writes nothing more
            if self._registry.requeue(job_id, owner):
                logger.warning(
                    "job %s queued again: still running at shutdown",
                    job_id,
                    extra={"job_id": job_id},
                )

    def alive(self) -> bool:
        """Every ingestion thread and the heartbeat run (a liveness probe's question)."""
        threads = [*self._threads, *([self._heartbeat] if self._heartbeat else [])]
        return not self._stopping.is_set() and all(thread.is_alive() for thread in threads)

    def has_room(self) -> bool:
        if self._thread_count == 0:
            # Nothing drains a local queue: the registry's queue is the one that fills.
            return self._registry.count_queued() < self._queue_size
        return not self._queue.full()

    def offer(self, job_id: str) -> bool:
        if self._thread_count == 0:
            return False
        try:
            self._queue.put_nowait(job_id)
        except queue.Full:
            return False
        return True

    def wait_for_change(self, timeout: float) -> None:
        with self._changed:
            self._changed.wait(timeout)

    def _beat(self) -> None:
        """Renew the lease of every job in hand, and queue again the jobs of workers that
        stopped renewing theirs (so a dead process's job waits one lease, not a restart)."""
        interval = self._lease.total_seconds() / BEATS_PER_LEASE
        while not self._heartbeat_stop.wait(interval):
            for job_id, owner in self._held.snapshot().items():
                try:
                    self._registry.renew_lease(job_id, owner, self._lease)
                except LeaseLost:
                    self._held.mark_lost(job_id)
                    logger.warning(
                        "job %s: lease taken by another worker", job_id, extra={"job_id": job_id}
                    )
                except DependencyUnavailable:
                    pass  # the store's Dependency logged the outage once
                except Exception:
                    logger.warning("job %s: lease not renewed", job_id, exc_info=True)
            if self._stopping.is_set():
                continue
            try:
                requeued = recover_interrupted(
                    self._registry,
                    self._store,
                    self._cleanup,
                    every_running=False,
                    observer=self._observer,
                )
            except DependencyUnavailable:
                continue  # the store's Dependency logged the outage once
            except Exception:
                logger.warning("expired leases not checked", exc_info=True)
                continue
            for job_id in requeued:
                self.offer(job_id)

    def _loop(self) -> None:
        owner = f"{self._owner_prefix}/{uuid.uuid4().hex[:8]}"
        # After a job, the next is claimed at once: jobs queued by another process (a queue-only
        # API) reach this one only through the registry, and waiting a poll between them cost
        # a worker a sixth of its time in the scaling benchmark.
        ran_one = False
        while not self._stopping.is_set():
            try:
                job_id: str | None = self._queue.get(block=not ran_one, timeout=POLL_SECONDS)
            except queue.Empty:
                job_id = None
            if self._stopping.is_set():
                return
            ran_one = False
            try:
                claimed = self._registry.claim_job(job_id or None, owner, self._lease)
                ran_one = claimed is not None
                if claimed is not None:
                    self._held.add(claimed.id, owner)
                    try:
                        self._run(claimed, owner)
                    finally:
                        self._held.remove(claimed.id)
            except DependencyUnavailable:
                pass  # a store is down; its Dependency logged the outage once
            except Exception:
                # The job stays running under a lease that will expire; it is retried then.
                logger.exception("ingestion worker failed")
            finally:
                with self._changed:
                    self._changed.notify_all()

    def _run(self, job: ClaimedJob, owner: str) -> None:
        facts = {"job_id": job.id, "attempt": job.attempt, "owner": owner}
        self._observer.ingest_job("claimed")
        logger.info("job %s claimed by %s (attempt %d)", job.id, owner, job.attempt, extra=facts)
        try:
            failures = self._index_job(job, owner)
        except _Stopping:
            if self._registry.release_job(job.id, owner):
                self._observer.ingest_job("released")
                logger.info("job %s given back at shutdown", job.id, extra=facts)
            return
        except _Cancelled:
            self._registry.finish_job(job.id, owner, None, cancelled=True)
            logger.info("job %s cancelled", job.id)
            return
        except LeaseLost:
            logger.warning("job %s: lease lost to another worker; abandoned", job.id, extra=facts)
            return
        except DependencyUnavailable:
            # A store is down (its Dependency logged it): the job goes back to the queue, not
            # counted as an attempt, and is claimed again once the store answers. Its re-run
            # rewrites the same chunk ids, so whatever this run wrote is replaced. With the
            # registry itself down, the lease runs out instead.
            with contextlib.suppress(DependencyUnavailable):
                self._registry.release_job(job.id, owner)
            raise
        error = None
        if failures:
            error = JobError(
                title="Ingestion failed",
                detail=f"{len(failures)} document(s) could not be indexed: {failures[0]}",
            )
        self._registry.finish_job(job.id, owner, error)
        self._observer.ingest_job("failed" if error else "succeeded")
        logger.info("job %s %s", job.id, "failed" if error else "succeeded", extra=facts)

    def _check_in_hand(self, job: ClaimedJob) -> None:
        """Between steps: stop for a shutdown, or for a lease the heartbeat lost."""
        if self._stopping.is_set():
            raise _Stopping
        if self._held.is_lost(job.id):
            raise LeaseLost(job.id)

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
            self._check_in_hand(job)
            try:
                spans = self._chunk(document)
            except DependencyUnavailable:
                raise  # not the document's fault: the whole job waits for the store
            except Exception as exc:
                self._fail(document, exc, failures)
                continue
            planned.append((document, spans))
        self._registry.start_progress(
            job.id,
            owner,
            self._lease,
            total=sum(len(spans) for _, spans in planned),
            work=work,
        )
        # One writer for the job: writes stay one at a time and in order, and a document's last
        # write and completion run while the next document's first batch is embedded (most
        # documents are one batch, which would otherwise wait for every write of theirs).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ragapi-write") as writer:
            finishing: _Finishing | None = None  # the documents before, still being written
            batches = shared_batches(planned, lambda planned_document: len(planned_document[1]))
            for number, batch in enumerate(batches):
                try:
                    if len(batch) == 1:
                        finishing = self._index_document(
                            job, owner, *batch[0], writer, finishing, failures
                        )
                    else:
                        finishing = self._index_together(
                            job, owner, batch, writer, finishing, failures
                        )
                except _Stopping:
                    self._settle(finishing, failures)
                    # The job goes back without counting an attempt: leave it no vectors to
                    # clean. Unless shutdown already queued it again (this thread overran its
                    # stop time): another worker may be writing these documents' vectors.
                    if not self._held.is_lost(job.id):
                        for document, _ in batch:
                            self._remove_vectors(document)
                    raise
                except _Cancelled:
                    self._settle(finishing, failures)
                    self._cancel([item for later in batches[number:] for item, _ in later])
                except (LeaseLost, DependencyUnavailable):
                    raise
                except Exception as exc:
                    self._settle(finishing, failures)
                    for document, _ in batch:
                        self._fail(document, exc, failures)
            self._settle(finishing, failures)
        return failures

    def _settle(self, finishing: _Finishing | None, failures: list[str]) -> None:
        """Wait for a document's last write and completion, and deal with how they ended."""
        if finishing is None or finishing.settled:
            return
        finishing.settled = True
        try:
            written = finishing.future.result()
        except (LeaseLost, DependencyUnavailable):
            raise
        except Exception as exc:
            for batch in finishing.batches:
                self._fail(batch.document, exc, failures)
            return
        for batch, recorded in zip(finishing.batches, written, strict=True):
            if not recorded:
                self._deletion_began(
                    finishing.job, finishing.owner, batch.document, len(batch.chunks)
                )

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
            raise UnreadableDocument(
                f"the stored copy of document {document.id} is missing"
            ) from None
        spans = self._chunker.split(decode_extracted(data))
        if not spans:
            raise UnreadableDocument("the document holds no text to index")
        return spans

    def _index_document(
        self,
        job: ClaimedJob,
        owner: str,
        document: DocumentWork,
        spans: Sequence[ChunkSpan],
        writer: ThreadPoolExecutor,
        before: _Finishing | None,
        failures: list[str],
    ) -> _Finishing | None:
        """Embed the document's batches, each while the one before it is written (writing waits
        on the vector store's and the registry's work, and the embedding would wait with it:
        about a tenth of a worker's time, scripts/bench --scaling). ``before``, the previous
        document's last write, is settled once this one's first batch is embedded. This one's
        last write and completion are left running: None when its deletion began first."""
        writing: tuple[int, Future[bool]] | None = None  # a batch's start, its write
        finishing: _Finishing | None = None
        try:
            for start in range(0, len(spans), EMBED_BATCH):
                self._check_in_hand(job)
                if self._registry.cancel_requested(job.id):
                    raise _Cancelled
                chunks = _chunks(document, spans[start : start + EMBED_BATCH])
                vectors = self._embed(chunks)
                self._settle(before, failures)
                if writing is not None and not writing[1].result():
                    self._deletion_began(job, owner, document, len(spans) - writing[0])
                    return None
                if start + EMBED_BATCH < len(spans):
                    write = writer.submit(self._write, job, owner, document, chunks, vectors)
                    writing = (start, write)
                else:
                    writing = None
                    last = [_LastBatch(document, chunks, spans)]
                    finishing = _Finishing(
                        job, owner, last, writer.submit(self._write_last, job, owner, last, vectors)
                    )
        except BaseException:
            if writing is not None:
                # Whatever ends this document waits for its write: the caller may remove what
                # was written.
                with contextlib.suppress(Exception):
                    writing[1].result()
            raise
        return finishing

    def _index_together(
        self,
        job: ClaimedJob,
        owner: str,
        batch: Sequence[tuple[DocumentWork, Sequence[ChunkSpan]]],
        writer: ThreadPoolExecutor,
        before: _Finishing | None,
        failures: list[str],
    ) -> _Finishing:
        """Small documents' chunks embedded in one call, while the documents before are
        written; their write and completion are left running."""
        self._check_in_hand(job)
        if self._registry.cancel_requested(job.id):
            raise _Cancelled
        last = [_LastBatch(document, _chunks(document, spans), spans) for document, spans in batch]
        vectors = self._embed([chunk for each in last for chunk in each.chunks])
        self._settle(before, failures)
        return _Finishing(
            job, owner, last, writer.submit(self._write_last, job, owner, last, vectors)
        )

    def _embed(self, chunks: Sequence[Chunk]) -> list[list[float]]:
        started = time.perf_counter()
        vectors = self._embeddings.embed_documents([chunk.text for chunk in chunks])
        self._observer.observe("embedding", time.perf_counter() - started)
        self._observer.chunks_embedded(len(chunks))
        if len(vectors) != len(chunks):
            raise RuntimeError(f"{len(vectors)} vectors for {len(chunks)} chunks")
        return vectors

    def _write_last(
        self,
        job: ClaimedJob,
        owner: str,
        last: Sequence[_LastBatch],
        vectors: Sequence[Sequence[float]],
    ) -> list[bool]:
        """Documents' last batches (their vectors in one request), then each document becomes
        ready (or its new version current); for each, False when its deletion began before
        its batch's rows were recorded."""
        tenant = last[0].document.tenant  # a job's documents are one tenant's
        chunks = [chunk for each in last for chunk in each.chunks]
        self._store.add(
            tenant, chunks, vectors, {each.document.id: each.document.metadata for each in last}
        )
        recorded = self._registry.add_chunks(
            job.id, owner, self._lease, [(each.document, each.chunks) for each in last]
        )
        complete = [each for each, ok in zip(last, recorded, strict=True) if ok]
        ids = [
            chunk_id(each.document.id, span.index, each.document.version)
            for each in complete
            for span in each.spans
        ]
        stored = self._store.count(tenant, ids)
        if stored != len(ids):
            raise RuntimeError(f"the vector store holds {stored} of {len(ids)} vectors")
        for each in complete:
            self._complete(each.document, len(each.spans))
        return recorded

    def _complete(self, document: DocumentWork, chunks: int) -> None:
        """Every chunk written: the document becomes ready, or its new version current."""
        if not document.replacement:
            # False means deletion began after the last batch was recorded; the deleter removes
            # every vector written so far, so nothing is left to do here.
            self._registry.mark_ready(document.id, chunks)
            return
        retired = self._registry.swap_version(document.id, document.version)
        if retired is None:
            # The document was deleted meanwhile (its deleter removes every version's vectors).
            self._remove_vectors(document)
            return
        self._cleanup.retire(retired)

    def _write(
        self,
        job: ClaimedJob,
        owner: str,
        document: DocumentWork,
        chunks: Sequence[Chunk],
        vectors: Sequence[Sequence[float]],
    ) -> bool:
        """Vectors first, then the chunk rows and progress; False when the document's deletion
        began before the rows were recorded."""
        self._store.add(document.tenant, chunks, vectors, {document.id: document.metadata})
        [recorded] = self._registry.add_chunks(job.id, owner, self._lease, [(document, chunks)])
        return recorded

    def _deletion_began(
        self, job: ClaimedJob, owner: str, document: DocumentWork, not_written: int
    ) -> None:
        """Its deletion began after our vectors were written, perhaps after the deleter removed
        the document's vectors: remove ours, and count the rest as not due."""
        self._remove_vectors(document)
        self._registry.skip_chunks(job.id, owner, self._lease, not_written)

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
