"""The registry's documents: registering uploads with their job (deduplicated per tenant),
reading, listing and the steps of a deletion.

Document statuses are the public ones (pending, ready, failed) plus ``deleting``: a document
whose removal has begun is invisible to every read, and ``RagService.start`` finishes removing it
after a crash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from impl.db import Database, decode_time_cursor, encode_time_cursor, utcnow
from impl.errors import Conflict, NotFound, PreconditionFailed
from impl.rag.events import EventLog, EventType
from impl.rag.job_queue import job_from_row
from impl.rag.originals import store_contents
from impl.rag.tables import (
    DELETING,
    LIVE_STATUSES,
    ChunkRow,
    DocumentRow,
    JobDocumentRow,
    JobRow,
    ReplacementRow,
    RetiredVersionRow,
    delete_chunks,
    delete_version_chunks,
    document_from_row,
    new_id,
    rowcount,
)
from impl.rag.types import Document, DocumentStatus, Job, JobStatus, Metadata, Page

# Every search asks this (the ready guard), so it is built once, on the table's columns: an
# ORM select built per call cost about twice the CPU (270 against 155 us a call, measured).
# By primary key only: given the status too, SQLite prefers the status index and reads every
# ready document (3.4 ms at 4.5k documents, against 0.03 ms by key).
_DOCUMENTS = DocumentRow.__table__.c
_READY_VERSIONS = select(
    _DOCUMENTS.id, _DOCUMENTS.title, _DOCUMENTS.version, _DOCUMENTS.tenant, _DOCUMENTS.status
).where(_DOCUMENTS.id.in_(bindparam("ids", expanding=True)))


@dataclass(frozen=True)
class NewDocument:
    """A validated upload whose bytes and extracted text are already stored."""

    sha256: str
    title: str
    filename: str | None
    media_type: str
    size_bytes: int
    original_key: str
    extracted_key: str
    metadata: Metadata


@dataclass(frozen=True)
class RetiredVersion:
    """A version a swap replaced, whose vectors and stored bytes are still to be removed."""

    document_id: str
    tenant: str
    version: int
    chunk_count: int
    keys: tuple[str, ...]


def document_etag(document: Document) -> str:
    """A strong entity tag of the document as the API shows it: it changes whenever any field
    does (every change moves updated_at; the rest are in for certainty)."""
    facts = [
        document.id,
        str(document.version),
        document.status,
        document.updated_at.isoformat(),
        str(document.chunk_count),
        document.sha256,
        document.title,
        json.dumps(document.metadata, sort_keys=True),
    ]
    return hashlib.sha256("\x1f".join(facts).encode()).hexdigest()[:32]


def check_precondition(document: Document, if_match: Sequence[str] | None) -> None:
    """Raise PreconditionFailed unless ``if_match`` (entity tags, or ``*``) names the
    document's current state; None: no condition."""
    if if_match is None or "*" in if_match:
        return
    if document_etag(document) not in if_match:
        raise PreconditionFailed(
            f"document {document.id} has changed (its ETag is no longer the one given)"
        )


@dataclass(frozen=True)
class StoredObjects:
    """The storage keys a document holds; freed when no other document uses them."""

    document_id: str
    tenant: str
    keys: tuple[str, ...]


class Documents(EventLog):
    """The registry's document rows (a part of ``Registry``)."""

    _db: Database

    def find_live(self, tenant: str, sha256s: Sequence[str]) -> dict[str, str]:
        """Document ids by sha256 for the given contents the tenant already holds."""
        with self._db.read() as session:
            return self._find_live(session, tenant, sha256s)

    @staticmethod
    def _find_live(session: Session, tenant: str, sha256s: Sequence[str]) -> dict[str, str]:
        if not sha256s:
            return {}
        rows = session.execute(
            select(DocumentRow.sha256, DocumentRow.id).where(
                DocumentRow.tenant == tenant,
                DocumentRow.sha256.in_(set(sha256s)),
                DocumentRow.status.in_(LIVE_STATUSES),
            )
        )
        return {sha: doc_id for sha, doc_id in rows}

    def register_ingest(
        self,
        tenant: str,
        items: Sequence[NewDocument],
        contents: Mapping[str, bytes] | None = None,
    ) -> Job:
        """Create the documents and their job in one transaction. Items whose content the tenant
        already holds (or that repeat an earlier item) map to the existing document; a job with
        nothing new to index is created already succeeded. ``contents``: the bytes by storage
        key, when the registry holds the originals; those of the new documents are written in
        the same transaction."""
        for attempt in range(3):
            try:
                return self._register_ingest(tenant, items, contents or {})
            except IntegrityError:
                # Another process registered the same content between our check and insert;
                # the next round finds its document and reports a duplicate.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _register_ingest(
        self, tenant: str, items: Sequence[NewDocument], contents: Mapping[str, bytes]
    ) -> Job:
        now = utcnow()
        job_id = new_id("job")
        with self._db.write() as session:
            existing = self._find_live(session, tenant, [item.sha256 for item in items])
            created: dict[str, str] = {}
            links: dict[str, bool] = {}  # document id -> duplicate, in item order
            for item in items:
                if item.sha256 in existing:
                    links.setdefault(existing[item.sha256], True)
                    continue
                if item.sha256 not in created:
                    store_contents(
                        session,
                        {
                            key: contents[key]
                            for key in (item.original_key, item.extracted_key)
                            if key in contents
                        },
                    )
                    doc_id = new_id("doc")
                    created[item.sha256] = doc_id
                    session.add(
                        DocumentRow(
                            id=doc_id,
                            tenant=tenant,
                            title=item.title,
                            filename=item.filename,
                            media_type=item.media_type,
                            size_bytes=item.size_bytes,
                            sha256=item.sha256,
                            original_key=item.original_key,
                            extracted_key=item.extracted_key,
                            chunk_count=0,
                            status="pending",
                            error=None,
                            metadata_=dict(item.metadata),
                            created_at=now,
                            updated_at=now,
                        )
                    )
                links.setdefault(created[item.sha256], False)
            status: JobStatus = "queued" if created else "succeeded"
            job = _new_job(job_id, tenant, status, now)
            session.add(job)
            session.flush()  # the job row first: job_documents points at it
            for position, (doc_id, duplicate) in enumerate(links.items()):
                session.add(
                    JobDocumentRow(
                        job_id=job_id,
                        document_id=doc_id,
                        tenant=tenant,
                        position=position,
                        duplicate=duplicate,
                    )
                )
            session.flush()
            self._record_submitted(session, job)
            return job_from_row(session, job)

    def _record_submitted(self, session: Session, job: JobRow) -> None:
        if job.status == "queued":
            self._record_event(session, job.tenant, "job.queued", job_id=job.id)
        else:  # nothing to index: it has already succeeded
            self._record_event(
                session, job.tenant, "job.finished", job_id=job.id, status=job.status, error=None
            )

    def _record_document_event(
        self, session: Session, document_id: str, event_type: EventType, **data: Any
    ) -> None:
        """An event of a new document, with the job that indexes it."""
        job_id = session.scalar(
            select(JobDocumentRow.job_id).where(
                JobDocumentRow.document_id == document_id, JobDocumentRow.duplicate.is_(False)
            )
        )
        tenant = session.scalar(select(DocumentRow.tenant).where(DocumentRow.id == document_id))
        if tenant is not None:
            self._record_event(
                session, tenant, event_type, job_id=job_id, document_id=document_id, **data
            )

    def mark_ready(self, document_id: str, chunk_count: int) -> bool:
        """Pending -> ready; False when the document is being deleted (or gone)."""
        with self._db.write() as session:
            changed = session.execute(
                update(DocumentRow)
                .where(DocumentRow.id == document_id, DocumentRow.status == "pending")
                .values(status="ready", chunk_count=chunk_count, updated_at=utcnow())
            )
            if rowcount(changed) != 1:
                return False
            self._record_document_event(
                session, document_id, "document.ready", version=1, chunk_count=chunk_count
            )
            return True

    def mark_failed(self, document_id: str, reason: str) -> bool:
        """Pending -> failed with ``reason``, dropping its chunk rows (the caller has already
        removed the vectors). False when the document was no longer pending."""
        with self._db.write() as session:
            delete_chunks(session, [document_id])
            changed = session.execute(
                update(DocumentRow)
                .where(DocumentRow.id == document_id, DocumentRow.status == "pending")
                .values(status="failed", error=reason, chunk_count=0, updated_at=utcnow())
            )
            if rowcount(changed) != 1:
                return False
            self._record_document_event(session, document_id, "document.failed", reason=reason)
            return True

    def update_document(
        self,
        tenant: str,
        document_id: str,
        *,
        title: str,
        metadata: Metadata,
        if_match: Sequence[str] | None,
    ) -> Document:
        """Set the title and metadata of a ready or failed document that no replacement is
        indexing (Conflict otherwise)."""
        with self._db.write() as session:
            row = self._visible(session, tenant, document_id)
            check_precondition(document_from_row(row), if_match)
            if row.status == "pending":
                raise Conflict(f"document {document_id} is still being indexed")
            if session.get(ReplacementRow, document_id) is not None:
                raise Conflict(f"document {document_id} is being replaced")
            row.title = title
            row.metadata_ = dict(metadata)
            row.updated_at = utcnow()
            session.flush()
            self._record_event(
                session,
                tenant,
                "document.updated",
                document_id=document_id,
                version=row.version,
                title=title,
                metadata=dict(metadata),
            )
            return document_from_row(row)

    @staticmethod
    def _visible(session: Session, tenant: str, document_id: str) -> DocumentRow:
        row = session.get(DocumentRow, document_id, with_for_update=True)
        if row is None or row.tenant != tenant or row.status == DELETING:
            raise NotFound(f"document {document_id} not found")
        return row

    def register_replacement(
        self,
        tenant: str,
        document_id: str,
        item: NewDocument | None,
        *,
        title: str | None,
        metadata: Metadata | None,
        if_match: Sequence[str] | None,
        contents: Mapping[str, bytes] | None = None,
    ) -> Job:
        """The next version of a ready document and the job that indexes it, in one
        transaction; the same content as now makes a job that has already succeeded, listing
        the document as a duplicate. ``item`` None: a re-index, the stored content cut and
        embedded again under the current settings. ``title`` and ``metadata``: None keeps the
        document's. ``contents``: the new version's bytes by storage key, when the registry
        holds the originals; written in the same transaction."""
        now = utcnow()
        with self._db.write() as session:
            row = self._visible(session, tenant, document_id)
            check_precondition(document_from_row(row), if_match)
            if item is None:
                item = NewDocument(
                    sha256=row.sha256,
                    title=row.title,
                    filename=row.filename,
                    media_type=row.media_type,
                    size_bytes=row.size_bytes,
                    original_key=row.original_key,
                    extracted_key=row.extracted_key,
                    metadata=dict(row.metadata_),
                )
                unchanged = False
            else:
                unchanged = row.sha256 == item.sha256
            if not unchanged:
                if row.status != "ready":
                    raise Conflict(
                        f"document {document_id} is {row.status}; only a ready one is replaced"
                    )
                if session.get(ReplacementRow, document_id) is not None:
                    raise Conflict(f"document {document_id} is already being replaced")
                holder = self._find_live(session, tenant, [item.sha256]).get(item.sha256)
                if holder not in (None, document_id):
                    raise Conflict(f"document {holder} already holds this content")
                store_contents(session, dict(contents or {}))
            job = _new_job(new_id("job"), tenant, "succeeded" if unchanged else "queued", now)
            session.add(job)
            session.flush()
            session.add(
                JobDocumentRow(
                    job_id=job.id,
                    document_id=document_id,
                    tenant=tenant,
                    position=0,
                    duplicate=unchanged,
                )
            )
            if not unchanged:
                session.add(
                    ReplacementRow(
                        document_id=document_id,
                        tenant=tenant,
                        job_id=job.id,
                        version=row.version + 1,
                        sha256=item.sha256,
                        title=row.title if title is None else title,
                        filename=item.filename,
                        media_type=item.media_type,
                        size_bytes=item.size_bytes,
                        original_key=item.original_key,
                        extracted_key=item.extracted_key,
                        metadata_=dict(row.metadata_ if metadata is None else metadata),
                        created_at=now,
                    )
                )
            session.flush()
            self._record_submitted(session, job)
            return job_from_row(session, job)

    def register_tenant_reindex(self, tenant: str) -> Job:
        """One job that re-indexes every ready document of the tenant that no replacement is
        indexing: for each, the next version from its stored content, swapped in on its own
        once complete (as ``register_replacement`` with no new content). A tenant with nothing
        to re-index gets a job already succeeded."""
        now = utcnow()
        with self._db.write() as session:
            rows = session.scalars(
                select(DocumentRow)
                .where(
                    DocumentRow.tenant == tenant,
                    DocumentRow.status == "ready",
                    DocumentRow.id.not_in(select(ReplacementRow.document_id)),
                )
                .order_by(DocumentRow.created_at, DocumentRow.id)
                .with_for_update()
            ).all()
            job = _new_job(new_id("job"), tenant, "queued" if rows else "succeeded", now)
            session.add(job)
            session.flush()
            for position, row in enumerate(rows):
                session.add(
                    JobDocumentRow(
                        job_id=job.id,
                        document_id=row.id,
                        tenant=tenant,
                        position=position,
                        duplicate=False,
                    )
                )
                session.add(
                    ReplacementRow(
                        document_id=row.id,
                        tenant=tenant,
                        job_id=job.id,
                        version=row.version + 1,
                        sha256=row.sha256,
                        title=row.title,
                        filename=row.filename,
                        media_type=row.media_type,
                        size_bytes=row.size_bytes,
                        original_key=row.original_key,
                        extracted_key=row.extracted_key,
                        metadata_=dict(row.metadata_),
                        created_at=now,
                    )
                )
            session.flush()
            return job_from_row(session, job)

    def swap_version(self, document_id: str, version: int) -> RetiredVersion | None:
        """Make the indexed replacement the document's version, in one transaction: from its
        commit every read sees the new version and none the old. The old version's chunk rows
        go in the same transaction; its vectors and bytes are left to remove, as returned. None
        when the replacement is gone (the document was deleted, or the job cancelled)."""
        with self._db.write() as session:
            row = session.get(DocumentRow, document_id, with_for_update=True)
            new = session.get(ReplacementRow, document_id)
            if row is None or new is None or new.version != version or row.status != "ready":
                return None
            retired = RetiredVersionRow(
                document_id=row.id,
                version=row.version,
                tenant=row.tenant,
                chunk_count=row.chunk_count,
                original_key=row.original_key,
                extracted_key=row.extracted_key,
            )
            session.add(retired)
            delete_version_chunks(session, row.id, row.version)
            chunk_count = session.scalar(
                select(func.count())
                .select_from(ChunkRow)
                .where(ChunkRow.document_id == row.id, ChunkRow.version == version)
            )
            row.version = version
            row.sha256 = new.sha256
            row.title = new.title
            row.filename = new.filename
            row.media_type = new.media_type
            row.size_bytes = new.size_bytes
            row.original_key = new.original_key
            row.extracted_key = new.extracted_key
            row.metadata_ = dict(new.metadata_)
            row.chunk_count = int(chunk_count or 0)
            row.updated_at = utcnow()
            session.delete(new)
            self._record_event(
                session,
                row.tenant,
                "document.ready",
                job_id=new.job_id,
                document_id=row.id,
                version=version,
                chunk_count=row.chunk_count,
            )
            return _retired(retired)

    def being_replaced(self, document_id: str) -> bool:
        with self._db.read() as session:
            return session.get(ReplacementRow, document_id) is not None

    def abandoned_replacements(self) -> list[tuple[str, str, int]]:
        """(tenant, document id, version) of the replacements whose job will not run them (it
        was cancelled or failed before the replacement was dropped, then the process died)."""
        with self._db.read() as session:
            rows = session.execute(
                select(ReplacementRow.tenant, ReplacementRow.document_id, ReplacementRow.version)
                .join(JobRow, JobRow.id == ReplacementRow.job_id, isouter=True)
                .where(or_(JobRow.id.is_(None), JobRow.status.not_in(("queued", "running"))))
            )
            return [(tenant, doc_id, version) for tenant, doc_id, version in rows]

    def drop_replacement(self, document_id: str, version: int) -> tuple[str, ...]:
        """Forget a replacement that will not be swapped in (failed or cancelled) with its
        chunk rows (the caller has removed its vectors); the storage keys it held."""
        with self._db.write() as session:
            new = session.get(ReplacementRow, document_id)
            delete_version_chunks(session, document_id, version)
            if new is None or new.version != version:
                return ()
            session.delete(new)
            return (new.original_key, new.extracted_key)

    def retired_versions(self) -> list[RetiredVersion]:
        with self._db.read() as session:
            return [_retired(row) for row in session.scalars(select(RetiredVersionRow))]

    def forget_retired(self, document_id: str, version: int) -> None:
        with self._db.write() as session:
            session.execute(
                delete(RetiredVersionRow).where(
                    RetiredVersionRow.document_id == document_id,
                    RetiredVersionRow.version == version,
                )
            )

    def get_document(self, tenant: str, document_id: str) -> Document | None:
        with self._db.read() as session:
            row = session.get(DocumentRow, document_id)
            if row is None or row.tenant != tenant or row.status == DELETING:
                return None
            return document_from_row(row)

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
        """Newest first by (created_at, id); the cursor names the last item of a page."""
        query = select(DocumentRow).where(DocumentRow.tenant == tenant)
        if status is None:
            query = query.where(DocumentRow.status != DELETING)
        else:
            query = query.where(DocumentRow.status == status)
        if title_contains:
            query = query.where(
                func.lower(DocumentRow.title).contains(title_contains.lower(), autoescape=True)
            )
        if created_after is not None:
            query = query.where(DocumentRow.created_at > created_after)
        if created_before is not None:
            query = query.where(DocumentRow.created_at < created_before)
        if cursor is not None:
            last_created, last_id = decode_time_cursor(cursor)
            query = query.where(
                or_(
                    DocumentRow.created_at < last_created,
                    and_(DocumentRow.created_at == last_created, DocumentRow.id < last_id),
                )
            )
        query = query.order_by(DocumentRow.created_at.desc(), DocumentRow.id.desc()).limit(
            limit + 1
        )
        with self._db.read() as session:
            rows = list(session.scalars(query))
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_cursor = encode_time_cursor(last.created_at, last.id)
        return Page(items=[document_from_row(row) for row in rows], next_cursor=next_cursor)

    def ready_versions(
        self, tenant: str, document_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        """Title and current version of those of the given documents that are the tenant's and
        ready."""
        if not document_ids:
            return {}
        with self._db.read() as session:
            rows = session.execute(_READY_VERSIONS, {"ids": list(set(document_ids))})
            return {
                doc_id: (title, version)
                for doc_id, title, version, owner, status in rows
                if owner == tenant and status == "ready"
            }

    def ready_metadata(
        self, tenant: str, document_ids: Collection[str] | None
    ) -> dict[str, Metadata]:
        """The metadata of the tenant's ready documents (of ``document_ids`` when given)."""
        statement = select(DocumentRow.id, DocumentRow.metadata_).where(
            DocumentRow.tenant == tenant, DocumentRow.status == "ready"
        )
        if document_ids is not None:
            statement = statement.where(DocumentRow.id.in_(list(document_ids)))
        with self._db.read() as session:
            return {doc_id: metadata for doc_id, metadata in session.execute(statement)}

    def mark_deleting(
        self, tenant: str, document_id: str, if_match: Sequence[str] | None = None
    ) -> StoredObjects | None:
        """First step of a deletion: from here on the document is invisible, and a crash before
        the last step is finished by the next start. A document whose deletion began already
        is returned again, so that a DELETE retried after one a store's outage stopped
        finishes it (every later step is idempotent). None when there is no such document."""
        with self._db.write() as session:
            row = session.get(DocumentRow, document_id, with_for_update=True)
            if row is None or row.tenant != tenant:
                return None
            check_precondition(document_from_row(row), if_match)
            if row.status != DELETING:
                self._record_event(session, tenant, "document.deleted", document_id=document_id)
            row.status = DELETING
            row.updated_at = utcnow()
            return _stored_objects(session, row)

    def being_deleted(self) -> list[StoredObjects]:
        with self._db.read() as session:
            rows = session.scalars(select(DocumentRow).where(DocumentRow.status == DELETING))
            return [_stored_objects(session, row) for row in rows]

    def delete_document_row(self, target: StoredObjects) -> None:
        """Last step of a deletion, chunk rows of every version, a replacement and retired
        versions included (explicitly: a backend without foreign key enforcement would not
        cascade)."""
        document_id = target.document_id
        with self._db.write() as session:
            delete_chunks(session, [document_id])
            session.execute(delete(ReplacementRow).where(ReplacementRow.document_id == document_id))
            session.execute(
                delete(RetiredVersionRow).where(RetiredVersionRow.document_id == document_id)
            )
            session.execute(delete(DocumentRow).where(DocumentRow.id == document_id))


def _new_job(job_id: str, tenant: str, status: JobStatus, now: datetime) -> JobRow:
    """A job as registered: nothing attempted or done yet."""
    return JobRow(
        id=job_id,
        tenant=tenant,
        status=status,
        attempts=0,
        chunks_done=0,
        chunks_total=0,
        cancel_requested=False,
        created_at=now,
        updated_at=now,
    )


def _retired(row: RetiredVersionRow) -> RetiredVersion:
    return RetiredVersion(
        document_id=row.document_id,
        tenant=row.tenant,
        version=row.version,
        chunk_count=row.chunk_count,
        keys=(row.original_key, row.extracted_key),
    )


def _stored_objects(session: Session, row: DocumentRow) -> StoredObjects:
    """Every key the document holds: its own, a replacement's and retired versions'."""
    keys = [row.original_key, row.extracted_key]
    new = session.get(ReplacementRow, row.id)
    if new is not None:
        keys += [new.original_key, new.extracted_key]
    for retired in session.scalars(
        select(RetiredVersionRow).where(RetiredVersionRow.document_id == row.id)
    ):
        keys += [retired.original_key, retired.extracted_key]
    return StoredObjects(row.id, row.tenant, tuple(dict.fromkeys(keys)))
