"""The schema as ragapi made it before it had migrations (create_all).

A database made then holds some or all of these tables already (the lexical index's arrived
later, and create_all added missing tables at each start), so each table is created only when
it is missing: such a database then joins the migrations without being rebuilt.

Revision ID: 0001
Revises: none
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None

LIVE = sa.text("status IN ('pending', 'ready')")


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())

    if "meta" not in existing:
        op.create_table(
            "meta",
            sa.Column("key", sa.String(64), primary_key=True),
            sa.Column("value", sa.Text(), nullable=False),
        )

    if "documents" not in existing:
        op.create_table(
            "documents",
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("tenant", sa.String(256), nullable=False),
            sa.Column("title", sa.Text(), nullable=False),
            sa.Column("filename", sa.Text()),
            sa.Column("media_type", sa.String(128), nullable=False),
            sa.Column("size_bytes", sa.Integer(), nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            sa.Column("original_key", sa.String(128), nullable=False),
            sa.Column("extracted_key", sa.String(128), nullable=False),
            sa.Column("chunk_count", sa.Integer(), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("error", sa.Text()),
            sa.Column("metadata", sa.JSON(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
        )
        op.create_index("ix_documents_tenant_created", "documents", ["tenant", "created_at", "id"])
        op.create_index("ix_documents_status", "documents", ["status"])
        op.create_index("ix_documents_original_key", "documents", ["original_key"])
        op.create_index("ix_documents_extracted_key", "documents", ["extracted_key"])
        op.create_index(
            "ux_documents_tenant_sha256_live",
            "documents",
            ["tenant", "sha256"],
            unique=True,
            sqlite_where=LIVE,
            postgresql_where=LIVE,
        )

    if "jobs" not in existing:
        op.create_table(
            "jobs",
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("tenant", sa.String(256), nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("lease_owner", sa.String(128)),
            sa.Column("lease_expires_at", sa.DateTime()),
            sa.Column("chunks_done", sa.Integer(), nullable=False),
            sa.Column("chunks_total", sa.Integer(), nullable=False),
            sa.Column("error_title", sa.Text()),
            sa.Column("error_detail", sa.Text()),
            sa.Column("created_at", sa.DateTime(), nullable=False),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
        )
        op.create_index("ix_jobs_status_created", "jobs", ["status", "created_at"])

    if "job_documents" not in existing:
        op.create_table(
            "job_documents",
            sa.Column(
                "job_id",
                sa.String(64),
                sa.ForeignKey("jobs.id", ondelete="CASCADE"),
                primary_key=True,
            ),
            sa.Column("document_id", sa.String(64), primary_key=True),
            sa.Column("tenant", sa.String(256), nullable=False),
            sa.Column("position", sa.Integer(), nullable=False),
            sa.Column("duplicate", sa.Boolean(), nullable=False),
        )

    if "chunks" not in existing:
        op.create_table(
            "chunks",
            sa.Column("id", sa.String(128), primary_key=True),
            sa.Column(
                "document_id",
                sa.String(64),
                sa.ForeignKey("documents.id", ondelete="CASCADE"),
                nullable=False,
            ),
            sa.Column("tenant", sa.String(256), nullable=False),
            sa.Column("chunk_index", sa.Integer(), nullable=False),
            sa.Column("text", sa.Text(), nullable=False),
            sa.Column("page", sa.Integer()),
            sa.Column("start_char", sa.Integer(), nullable=False),
            sa.Column("end_char", sa.Integer(), nullable=False),
            sa.UniqueConstraint("document_id", "chunk_index"),
        )

    if "lexical_postings" not in existing:
        op.create_table(
            "lexical_postings",
            sa.Column("tenant", sa.String(256), primary_key=True),
            sa.Column("term", sa.String(64), primary_key=True),
            sa.Column("chunk_id", sa.String(128), primary_key=True),
            sa.Column("document_id", sa.String(64), nullable=False),
            sa.Column("frequency", sa.Integer(), nullable=False),
            sa.Column("chunk_terms", sa.Integer(), nullable=False),
            # Each term's postings together in key order: BM25 reads a term's range with no
            # table lookup per posting (docs/benchmarks.md: 1.6x less CPU per search).
            sqlite_with_rowid=False,
        )
        op.create_index("ix_lexical_postings_document", "lexical_postings", ["document_id"])

    if "lexical_stats" not in existing:
        op.create_table(
            "lexical_stats",
            sa.Column("tenant", sa.String(256), primary_key=True),
            sa.Column("chunks", sa.Integer(), nullable=False),
            sa.Column("terms", sa.Integer(), nullable=False),
        )

    if "api_keys" not in existing:
        op.create_table(
            "api_keys",
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("prefix", sa.String(32), nullable=False),
            sa.Column("secret_sha256", sa.String(64), nullable=False),
            sa.Column("name", sa.String(100), nullable=False),
            sa.Column("tenant", sa.String(64), nullable=False),
            sa.Column("scopes", sa.JSON(), nullable=False),
            sa.Column("rate_limits", sa.JSON(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("revoked_at", sa.DateTime(timezone=True)),
        )
        op.create_index("ix_api_keys_prefix", "api_keys", ["prefix"], unique=True)
        op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])


def downgrade() -> None:
    for table in (
        "api_keys",
        "lexical_stats",
        "lexical_postings",
        "chunks",
        "job_documents",
        "jobs",
        "documents",
        "meta",
    ):
        op.drop_table(table)
