"""The registry's tables (documents, ingestion jobs and the documents each covers, chunk rows,
originals when the registry holds them, store-wide facts) and what its parts share about their
rows. The migrations (impl/migrations) build them; the lexical index's tables are in
lexical.py, the API keys' in impl/security/keys.py."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    CursorResult,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Row,
    String,
    Text,
    UniqueConstraint,
    delete,
    false,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from impl.db import Base
from impl.rag import lexical
from impl.rag.types import Chunk, Document, DocumentStatus

DELETING = "deleting"
# A document whose content a tenant already holds is returned instead of stored again, unless
# the earlier one failed (so the same file can be tried again) or is being deleted.
LIVE_STATUSES = ("pending", "ready")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class MetaRow(Base):
    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class DocumentRow(Base):
    __tablename__ = "documents"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(256))
    title: Mapped[str] = mapped_column(Text)
    filename: Mapped[str | None] = mapped_column(Text)
    media_type: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    original_key: Mapped[str] = mapped_column(String(128))
    extracted_key: Mapped[str] = mapped_column(String(128))
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    # "metadata" is taken by the declarative base, hence the attribute name.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_documents_tenant_created", "tenant", "created_at", "id"),
        Index("ix_documents_status", "status"),
        Index("ix_documents_original_key", "original_key"),
        Index("ix_documents_extracted_key", "extracted_key"),
        # Guards deduplication against a second process registering the same bytes at once.
        Index(
            "ux_documents_tenant_sha256_live",
            "tenant",
            "sha256",
            unique=True,
            sqlite_where=text("status IN ('pending', 'ready')"),
            postgresql_where=text("status IN ('pending', 'ready')"),
        ),
    )


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    chunks_done: Mapped[int] = mapped_column(Integer, default=0)
    chunks_total: Mapped[int] = mapped_column(Integer, default=0)
    error_title: Mapped[str | None] = mapped_column(Text)
    error_detail: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)


class JobDocumentRow(Base):
    """Which documents a job covers. No foreign key to documents: a job keeps naming the
    documents it reported even after they are deleted."""

    __tablename__ = "job_documents"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    document_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(256))
    position: Mapped[int] = mapped_column(Integer)
    duplicate: Mapped[bool] = mapped_column(Boolean)


class OriginalRow(Base):
    """An original's bytes (or its extracted text) by sha256, when the registry holds them
    (RAGAPI_ORIGINALS_URL=registry://); tenants share rows, as they share files."""

    __tablename__ = "originals"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ChunkRow(Base):
    __tablename__ = "chunks"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(256))
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    chunk_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    page: Mapped[int | None] = mapped_column(Integer)
    start_char: Mapped[int] = mapped_column(Integer)
    end_char: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint(
            "document_id", "version", "chunk_index", name="uq_chunks_document_version_index"
        ),
    )


class ReplacementRow(Base):
    """The next version of a ready document while a job indexes it: at most one per document.
    Its chunks are written under ``version``; the swap (``Documents.swap_version``) moves what
    is here onto the document row in one transaction, the title and metadata included (the
    document's own unless the replacement gave new ones)."""

    __tablename__ = "document_replacements"
    document_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(256))
    job_id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(Text)
    filename: Mapped[str | None] = mapped_column(Text)
    media_type: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(Integer)
    original_key: Mapped[str] = mapped_column(String(128))
    extracted_key: Mapped[str] = mapped_column(String(128))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata")
    created_at: Mapped[datetime]

    __table_args__ = (Index("ix_document_replacements_job", "job_id"),)


class RetiredVersionRow(Base):
    """A version a swap replaced: its registry rows went with the swap, its vectors and stored
    bytes are removed after it (again at the next start, after a crash)."""

    __tablename__ = "retired_versions"
    document_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(256))
    chunk_count: Mapped[int] = mapped_column(Integer)
    original_key: Mapped[str] = mapped_column(String(128))
    extracted_key: Mapped[str] = mapped_column(String(128))


def document_from_row(row: DocumentRow) -> Document:
    return Document(
        id=row.id,
        title=row.title,
        filename=row.filename,
        media_type=row.media_type,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        chunk_count=row.chunk_count,
        version=row.version,
        status=cast(DocumentStatus, row.status),
        created_at=row.created_at,
        updated_at=row.updated_at,
        metadata=dict(row.metadata_),
        error=row.error,
    )


def chunk_from_row(row: ChunkRow | Row[*tuple[Any, ...]]) -> Chunk:
    """A chunk from its ORM row or a row of the table's columns."""
    return Chunk(
        id=row.id,
        document_id=row.document_id,
        index=row.chunk_index,
        version=row.version,
        text=row.text,
        page=row.page,
        start_char=row.start_char,
        end_char=row.end_char,
    )


def rowcount(result: Any) -> int:
    return cast(CursorResult[Any], result).rowcount


def delete_version_chunks(session: Session, document_id: str, version: int) -> None:
    """One version's chunk rows and their postings, in one transaction."""
    lexical.remove_version(session, document_id, version)
    session.execute(
        delete(ChunkRow).where(ChunkRow.document_id == document_id, ChunkRow.version == version)
    )


def delete_chunks(session: Session, document_ids: Sequence[str]) -> None:
    """The documents' chunk rows and their postings, in one transaction."""
    lexical.remove_documents(session, document_ids)
    session.execute(delete(ChunkRow).where(ChunkRow.document_id.in_(document_ids)))
