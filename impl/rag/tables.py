"""The registry's tables: documents, ingestion jobs and the documents each covers, chunk rows,
and store-wide facts. The migrations (impl/migrations) build them; the lexical index's tables
are in lexical.py, the API keys' in impl/security/keys.py."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from impl.db import Base


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


class ChunkRow(Base):
    __tablename__ = "chunks"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    document_id: Mapped[str] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(String(256))
    chunk_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    page: Mapped[int | None] = mapped_column(Integer)
    start_char: Mapped[int] = mapped_column(Integer)
    end_char: Mapped[int] = mapped_column(Integer)

    __table_args__ = (UniqueConstraint("document_id", "chunk_index"),)
