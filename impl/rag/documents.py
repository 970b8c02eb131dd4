"""The registry's documents: registering uploads with their job (deduplicated per tenant),
reading, listing and the steps of a deletion.

Document statuses are the public ones (pending, ready, failed) plus ``deleting``: a document
whose removal has begun is invisible to every read, and ``RagService.start`` finishes removing it
after a crash."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from impl.db import Database, decode_cursor, encode_cursor, utcnow
from impl.errors import InvalidInput
from impl.rag.job_queue import job_from_row
from impl.rag.originals import drop_unreferenced_contents, referenced_keys, store_contents
from impl.rag.tables import (
    DELETING,
    LIVE_STATUSES,
    DocumentRow,
    JobDocumentRow,
    JobRow,
    delete_chunks,
    document_from_row,
    new_id,
    rowcount,
)
from impl.rag.types import Document, DocumentStatus, Job, JobStatus, Metadata, Page


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
class StoredObjects:
    """The storage keys a document holds; freed when no other document uses them."""

    document_id: str
    tenant: str
    keys: tuple[str, ...]


class Documents:
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
            job = JobRow(
                id=job_id,
                tenant=tenant,
                status=status,
                attempts=0,
                chunks_done=0,
                chunks_total=0,
                created_at=now,
                updated_at=now,
            )
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
            return job_from_row(session, job)

    def mark_ready(self, document_id: str, chunk_count: int) -> bool:
        """Pending -> ready; False when the document is being deleted (or gone)."""
        with self._db.write() as session:
            changed = session.execute(
                update(DocumentRow)
                .where(DocumentRow.id == document_id, DocumentRow.status == "pending")
                .values(status="ready", chunk_count=chunk_count, updated_at=utcnow())
            )
            return rowcount(changed) == 1

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
            return rowcount(changed) == 1

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
            last_created, last_id = self._document_cursor(cursor)
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
            next_cursor = encode_cursor({"t": last.created_at.isoformat(), "i": last.id})
        return Page(items=[document_from_row(row) for row in rows], next_cursor=next_cursor)

    @staticmethod
    def _document_cursor(cursor: str) -> tuple[datetime, str]:
        payload = decode_cursor(cursor)
        created, doc_id = payload.get("t"), payload.get("i")
        if not isinstance(created, str) or not isinstance(doc_id, str):
            raise InvalidInput("the cursor is not valid")
        try:
            when = datetime.fromisoformat(created)
        except ValueError:
            raise InvalidInput("the cursor is not valid") from None
        if when.tzinfo is None:
            raise InvalidInput("the cursor is not valid")
        return when, doc_id

    def ready_titles(self, tenant: str, document_ids: Sequence[str]) -> dict[str, str]:
        """Titles of those of the given documents that are the tenant's and ready."""
        if not document_ids:
            return {}
        # By primary key only: given the status too, SQLite prefers the status index and reads
        # every ready document (3.4 ms at 4.5k documents, against 0.03 ms by key).
        with self._db.read() as session:
            rows = session.execute(
                select(
                    DocumentRow.id, DocumentRow.title, DocumentRow.tenant, DocumentRow.status
                ).where(DocumentRow.id.in_(set(document_ids)))
            )
            return {
                doc_id: title
                for doc_id, title, owner, status in rows
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

    def mark_deleting(self, tenant: str, document_id: str) -> StoredObjects | None:
        """First step of a deletion: from here on the document is invisible, and a crash before
        the last step is finished by the next start. A document whose deletion began already
        is returned again, so that a DELETE retried after one a store's outage stopped
        finishes it (every later step is idempotent)."""
        with self._db.write() as session:
            row = session.get(DocumentRow, document_id)
            if row is None or row.tenant != tenant:
                return None
            row.status = DELETING
            row.updated_at = utcnow()
            return StoredObjects(row.id, row.tenant, (row.original_key, row.extracted_key))

    def being_deleted(self) -> list[StoredObjects]:
        with self._db.read() as session:
            rows = session.scalars(select(DocumentRow).where(DocumentRow.status == DELETING))
            return [
                StoredObjects(row.id, row.tenant, (row.original_key, row.extracted_key))
                for row in rows
            ]

    def keys_in_use(self, keys: Collection[str], excluding: str | None = None) -> set[str]:
        """Which of ``keys`` a document (other than ``excluding``) still uses (any tenant: the
        storage is content-addressed, so tenants share bytes)."""
        with self._db.read() as session:
            return referenced_keys(session, keys, excluding)

    def delete_document_row(self, target: StoredObjects, *, drop_contents: bool) -> None:
        """Last step of a deletion, chunk rows included (explicitly: a backend without foreign
        key enforcement would not cascade); ``drop_contents``: also the registry's copies of
        its originals that no other document uses, in the same transaction."""
        with self._db.write() as session:
            delete_chunks(session, [target.document_id])
            session.execute(delete(DocumentRow).where(DocumentRow.id == target.document_id))
            if drop_contents:
                drop_unreferenced_contents(session, target.keys)
