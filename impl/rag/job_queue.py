"""The registry's ingestion jobs: claims under a lease (FOR UPDATE SKIP LOCKED on PostgreSQL, a
conditional update on SQLite), progress, completion, release, and what a crash left running."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from impl.db import Database, decode_time_cursor, encode_time_cursor, utcnow
from impl.errors import Conflict
from impl.rag import lexical
from impl.rag.events import EventLog
from impl.rag.tables import (
    ChunkRow,
    DocumentRow,
    JobDocumentRow,
    JobRow,
    ReplacementRow,
    delete_chunks,
    delete_version_chunks,
    rowcount,
)
from impl.rag.types import Chunk, Job, JobError, JobStatus, Metadata, Page

CANCELLED_DETAIL = "ingestion was cancelled"


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    attempt: int  # 1 for the first run; interrupted runs count, shutdowns do not


@dataclass(frozen=True)
class DocumentWork:
    """What a worker needs to index one document: a new one, or the next version of one
    (``replacement``), which is swapped in once complete."""

    id: str
    tenant: str
    extracted_key: str
    metadata: Metadata
    version: int = 1
    replacement: bool = False


@dataclass(frozen=True)
class Interrupted:
    """A running job with no live worker behind it, and its documents still pending."""

    job_id: str
    tenant: str
    lease_owner: str | None  # the worker that stopped renewing it
    document_ids: list[str]
    replacements: list[tuple[str, int]]  # (document id, version) being indexed
    gives_up: bool  # True: it ran out of attempts and is to be failed, not queued again


class LeaseLost(Exception):
    """The worker no longer owns the job it is running (another worker reclaimed it)."""


def job_from_row(session: Session, row: JobRow) -> Job:
    links = session.execute(
        select(JobDocumentRow.document_id, JobDocumentRow.duplicate)
        .where(JobDocumentRow.job_id == row.id)
        .order_by(JobDocumentRow.position)
    ).all()
    error = None
    if row.error_title is not None:
        error = JobError(title=row.error_title, detail=row.error_detail or "")
    return Job(
        id=row.id,
        status=cast(JobStatus, row.status),
        created_at=row.created_at,
        updated_at=row.updated_at,
        chunks_done=row.chunks_done,
        chunks_total=row.chunks_total,
        document_ids=[doc_id for doc_id, _ in links],
        duplicate_document_ids=[doc_id for doc_id, duplicate in links if duplicate],
        error=error,
        cancel_requested=row.cancel_requested,
    )


class JobRows(EventLog):
    """The registry's job rows (a part of ``Registry``; the JobQueue of impl/rag/stores.py)."""

    _db: Database

    def claim_job(self, job_id: str | None, owner: str, lease: timedelta) -> ClaimedJob | None:
        """Move a queued job to running under ``owner``'s lease: the given one, or the oldest
        queued one when ``job_id`` is None. None when there is nothing (left) to claim."""
        if job_id is not None or not self._db.is_sqlite:
            return self._claim(job_id, owner, lease)
        # A read first: idle workers poll, and must not take SQLite's write lock to do it. A
        # claim lost to another worker (two finished a job at once) looks again: that one took
        # the job, and the next may be queued; giving up waited a poll (scripts/bench --scaling).
        while oldest := self.queued_job_ids(1):
            claimed = self._claim(oldest[0], owner, lease)
            if claimed is not None:
                return claimed
        return None

    def _claim(self, job_id: str | None, owner: str, lease: timedelta) -> ClaimedJob | None:
        """One claim: of the given job, or (PostgreSQL) the oldest queued one no one locked."""
        now = utcnow()
        with self._db.write() as session:
            if job_id is None:
                # PostgreSQL: claimers at once each lock a different queued row instead of
                # queueing behind (or losing to) the first one.
                job_id = session.scalar(
                    select(JobRow.id)
                    .where(JobRow.status == "queued")
                    .order_by(JobRow.created_at, JobRow.id)
                    .limit(1)
                    .with_for_update(skip_locked=True)
                )
                if job_id is None:
                    return None
            # The status condition makes the claim atomic on any backend: of two claimers,
            # one updates a row and the other none.
            claimed = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued")
                .values(
                    status="running",
                    attempts=JobRow.attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + lease,
                    updated_at=now,
                )
            )
            if rowcount(claimed) != 1:
                return None
            attempts = session.scalar(select(JobRow.attempts).where(JobRow.id == job_id)) or 0
            self._record_job_event(session, job_id, "job.running", attempt=attempts)
            return ClaimedJob(id=job_id, attempt=attempts)

    def job_work(self, job_id: str) -> list[DocumentWork]:
        """The job's documents that still await indexing, in the order they were given."""
        with self._db.read() as session:
            rows = session.scalars(
                select(DocumentRow)
                .join(JobDocumentRow, JobDocumentRow.document_id == DocumentRow.id)
                .where(
                    JobDocumentRow.job_id == job_id,
                    JobDocumentRow.duplicate.is_(False),
                    DocumentRow.status == "pending",
                )
                .order_by(JobDocumentRow.position)
            )
            return [
                DocumentWork(
                    id=row.id,
                    tenant=row.tenant,
                    extracted_key=row.extracted_key,
                    metadata=dict(row.metadata_),
                )
                for row in rows
            ] + [
                DocumentWork(
                    id=new.document_id,
                    tenant=new.tenant,
                    extracted_key=new.extracted_key,
                    metadata=dict(new.metadata_),
                    version=new.version,
                    replacement=True,
                )
                for new in session.scalars(
                    select(ReplacementRow).where(ReplacementRow.job_id == job_id)
                )
            ]

    def _renew(
        self, session: Session, job_id: str, owner: str, lease: timedelta, **values: Any
    ) -> None:
        now = utcnow()
        renewed = session.execute(
            update(JobRow)
            .where(JobRow.id == job_id, JobRow.status == "running", JobRow.lease_owner == owner)
            .values(lease_expires_at=now + lease, updated_at=now, **values)
        )
        if rowcount(renewed) != 1:
            raise LeaseLost(job_id)

    def _record_progress(self, session: Session, job_id: str) -> None:
        done, total = session.execute(
            select(JobRow.chunks_done, JobRow.chunks_total).where(JobRow.id == job_id)
        ).one()
        self._record_job_event(
            session, job_id, "job.progress", chunks_done=done, chunks_total=total
        )

    def renew_lease(self, job_id: str, owner: str, lease: timedelta) -> None:
        """Extend the lease; LeaseLost when another worker has the job or it was queued again.
        A job that ended meanwhile (the heartbeat renews the jobs in hand as it last saw them)
        has no lease left to renew, which is no loss."""
        with self._db.write() as session:
            try:
                self._renew(session, job_id, owner, lease)
            except LeaseLost:
                status = session.scalar(select(JobRow.status).where(JobRow.id == job_id))
                if status in ("queued", "running"):
                    raise

    def start_progress(
        self, job_id: str, owner: str, lease: timedelta, total: int, work: Sequence[DocumentWork]
    ) -> None:
        """Drop chunk rows a crashed run left for this work and reset the progress."""
        with self._db.write() as session:
            delete_chunks(session, [item.id for item in work if not item.replacement])
            for item in work:
                if item.replacement:
                    delete_version_chunks(session, item.id, item.version)
            self._renew(session, job_id, owner, lease, chunks_done=0, chunks_total=total)
            self._record_progress(session, job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._db.read() as session:
            return bool(session.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))

    def add_chunks(
        self,
        job_id: str,
        owner: str,
        lease: timedelta,
        written: Sequence[tuple[DocumentWork, Sequence[Chunk]]],
    ) -> list[bool]:
        """Record indexed chunks of one or more documents and the job's progress, in one
        transaction. For each document, False, writing nothing of it, when it is no longer
        being indexed (deletion began, or the replacement was dropped): the caller then
        removes its vectors."""
        with self._db.write() as session:
            recorded: list[bool] = []
            rows: list[dict[str, Any]] = []
            indexed: list[Chunk] = []
            for work, chunks in written:
                # FOR UPDATE (PostgreSQL) keeps a deletion from starting before this commits.
                doc = session.execute(
                    select(DocumentRow.status, DocumentRow.tenant)
                    .where(DocumentRow.id == work.id)
                    .with_for_update()
                ).one_or_none()
                recorded.append(
                    doc is not None
                    and doc.status == ("ready" if work.replacement else "pending")
                    and (not work.replacement or self._replacing(session, work))
                )
                if not recorded[-1]:
                    continue
                assert doc is not None
                rows.extend(
                    {
                        "id": chunk.id,
                        "document_id": work.id,
                        "tenant": doc.tenant,
                        "version": work.version,
                        "chunk_index": chunk.index,
                        "text": chunk.text,
                        "page": chunk.page,
                        "start_char": chunk.start_char,
                        "end_char": chunk.end_char,
                    }
                    for chunk in chunks
                )
                indexed.extend(chunks)
            if not indexed:
                return recorded
            # A Core insert: the rows are not read back, so no ORM objects to track.
            session.execute(insert(cast(Table, ChunkRow.__table__)), rows)
            # A job's documents are one tenant's.
            lexical.index_chunks(session, written[0][0].tenant, indexed)
            self._renew(
                session, job_id, owner, lease, chunks_done=JobRow.chunks_done + len(indexed)
            )
            self._record_progress(session, job_id)
            return recorded

    @staticmethod
    def _replacing(session: Session, work: DocumentWork) -> bool:
        """The document's replacement is still this version."""
        new = session.get(ReplacementRow, work.id)
        return new is not None and new.version == work.version

    def skip_chunks(self, job_id: str, owner: str, lease: timedelta, count: int) -> None:
        """Take chunks that will not be indexed (their document went away) out of the total."""
        with self._db.write() as session:
            self._renew(session, job_id, owner, lease, chunks_total=JobRow.chunks_total - count)
            self._record_progress(session, job_id)

    def finish_job(
        self, job_id: str, owner: str, error: JobError | None, *, cancelled: bool = False
    ) -> None:
        with self._db.write() as session:
            now = utcnow()
            status: JobStatus = "cancelled" if cancelled else "failed" if error else "succeeded"
            finished = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running", JobRow.lease_owner == owner)
                .values(
                    status=status,
                    error_title=error.title if error else None,
                    error_detail=error.detail if error else None,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
            if rowcount(finished) != 1:
                raise LeaseLost(job_id)
            self._record_finished(session, job_id, status, error)

    def _record_finished(
        self, session: Session, job_id: str, status: JobStatus, error: JobError | None
    ) -> None:
        detail = None if error is None else {"title": error.title, "detail": error.detail}
        self._record_job_event(session, job_id, "job.finished", status=status, error=detail)

    def release_job(self, job_id: str, owner: str) -> bool:
        """Give a job back to the queue at shutdown; a shutdown is not an attempt that failed.
        False when ``owner`` no longer held it."""
        with self._db.write() as session:
            released = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running", JobRow.lease_owner == owner)
                .values(
                    status="queued",
                    attempts=JobRow.attempts - 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=utcnow(),
                )
            )
            if rowcount(released) != 1:
                return False
            self._record_job_event(session, job_id, "job.queued")
            return True

    def find_interrupted(self, *, every_running: bool, max_attempts: int) -> list[Interrupted]:
        """Running jobs no worker is running: all of them when only this process may run jobs
        (``every_running``), else those whose lease expired."""
        with self._db.read() as session:
            query = select(JobRow).where(JobRow.status == "running")
            if not every_running:
                query = query.where(
                    or_(JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < utcnow())
                )
            found = []
            for job in session.scalars(query):
                document_ids = session.scalars(
                    select(DocumentRow.id)
                    .join(JobDocumentRow, JobDocumentRow.document_id == DocumentRow.id)
                    .where(
                        JobDocumentRow.job_id == job.id,
                        JobDocumentRow.duplicate.is_(False),
                        DocumentRow.status == "pending",
                    )
                    .order_by(JobDocumentRow.position)
                )
                replacements = session.execute(
                    select(ReplacementRow.document_id, ReplacementRow.version).where(
                        ReplacementRow.job_id == job.id
                    )
                )
                found.append(
                    Interrupted(
                        job_id=job.id,
                        tenant=job.tenant,
                        lease_owner=job.lease_owner,
                        document_ids=list(document_ids),
                        replacements=[(doc_id, version) for doc_id, version in replacements],
                        gives_up=job.attempts >= max_attempts,
                    )
                )
            return found

    def requeue(self, job_id: str, owner: str | None) -> bool:
        """Queue a running job again, its attempt counted, if ``owner`` still holds it (of two
        processes reclaiming the same expired job, one does). False when it did not."""
        holder = JobRow.lease_owner.is_(None) if owner is None else JobRow.lease_owner == owner
        with self._db.write() as session:
            requeued = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running", holder)
                .values(
                    status="queued", lease_owner=None, lease_expires_at=None, updated_at=utcnow()
                )
            )
            if rowcount(requeued) != 1:
                return False
            self._record_job_event(session, job_id, "job.queued")
            return True

    def count_queued(self) -> int:
        with self._db.read() as session:
            queued = select(func.count()).select_from(JobRow).where(JobRow.status == "queued")
            return session.scalar(queued) or 0

    def give_up(self, job_id: str, document_ids: Sequence[str], error: JobError) -> None:
        """Fail an interrupted job and its unfinished documents (their vectors already gone;
        its replacements are dropped by the caller)."""
        with self._db.write() as session:
            now = utcnow()
            delete_chunks(session, document_ids)
            pending = (DocumentRow.id.in_(document_ids), DocumentRow.status == "pending")
            failed = session.scalars(select(DocumentRow.id).where(*pending)).all()
            session.execute(
                update(DocumentRow)
                .where(*pending)
                .values(status="failed", error=error.detail, chunk_count=0, updated_at=now)
            )
            given_up = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "running")
                .values(
                    status="failed",
                    error_title=error.title,
                    error_detail=error.detail,
                    lease_owner=None,
                    lease_expires_at=None,
                    updated_at=now,
                )
            )
            for document_id in failed:
                self._record_job_event(
                    session, job_id, "document.failed", document_id=document_id, reason=error.detail
                )
            if rowcount(given_up) == 1:
                self._record_finished(session, job_id, "failed", error)

    def queued_job_ids(self, limit: int) -> list[str]:
        with self._db.read() as session:
            return list(
                session.scalars(
                    select(JobRow.id)
                    .where(JobRow.status == "queued")
                    .order_by(JobRow.created_at, JobRow.id)
                    .limit(limit)
                )
            )

    def list_jobs(
        self, tenant: str, *, limit: int, cursor: str | None, status: JobStatus | None
    ) -> Page[Job]:
        """Newest first by (created_at, id); the cursor names the last item of a page."""
        query = select(JobRow).where(JobRow.tenant == tenant)
        if status is not None:
            query = query.where(JobRow.status == status)
        if cursor is not None:
            last_created, last_id = decode_time_cursor(cursor)
            query = query.where(
                or_(
                    JobRow.created_at < last_created,
                    and_(JobRow.created_at == last_created, JobRow.id < last_id),
                )
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit + 1)
        with self._db.read() as session:
            rows = list(session.scalars(query))
            next_cursor = None
            if len(rows) > limit:
                rows = rows[:limit]
                next_cursor = encode_time_cursor(rows[-1].created_at, rows[-1].id)
            return Page(items=[job_from_row(session, row) for row in rows], next_cursor=next_cursor)

    def cancel_job(
        self, tenant: str, job_id: str
    ) -> tuple[Job, list[str], list[tuple[str, int]]] | None:
        """A queued job ends cancelled at once, its new documents failed (their chunk rows
        dropped); a running one is asked to stop (its worker finishes the cancellation). The
        job, the documents failed here and the replacements the caller is to drop (vectors,
        then rows); None when there is no such job."""
        with self._db.write() as session:
            row = session.get(JobRow, job_id, with_for_update=True)
            if row is None or row.tenant != tenant:
                return None
            if row.status in ("succeeded", "failed"):
                raise Conflict(f"job {job_id} has already {row.status}")
            row.cancel_requested = True
            failed: list[str] = []
            replacements: list[tuple[str, int]] = []
            if row.status == "queued":
                now = utcnow()
                row.status = "cancelled"
                row.updated_at = now
                failed = list(
                    session.scalars(
                        select(DocumentRow.id)
                        .join(JobDocumentRow, JobDocumentRow.document_id == DocumentRow.id)
                        .where(
                            JobDocumentRow.job_id == job_id,
                            JobDocumentRow.duplicate.is_(False),
                            DocumentRow.status == "pending",
                        )
                    )
                )
                delete_chunks(session, failed)
                session.execute(
                    update(DocumentRow)
                    .where(DocumentRow.id.in_(failed), DocumentRow.status == "pending")
                    .values(status="failed", error=CANCELLED_DETAIL, chunk_count=0, updated_at=now)
                )
                for document_id in failed:
                    self._record_event(
                        session,
                        tenant,
                        "document.failed",
                        job_id=job_id,
                        document_id=document_id,
                        reason=CANCELLED_DETAIL,
                    )
                self._record_finished(session, job_id, "cancelled", None)
                replacements = [
                    (new.document_id, new.version)
                    for new in session.scalars(
                        select(ReplacementRow).where(ReplacementRow.job_id == job_id)
                    )
                ]
            session.flush()
            return job_from_row(session, row), failed, replacements

    def get_job(self, tenant: str, job_id: str) -> Job | None:
        with self._db.read() as session:
            row = session.get(JobRow, job_id)
            if row is None or row.tenant != tenant:
                return None
            return job_from_row(session, row)
