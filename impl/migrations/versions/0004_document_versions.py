"""Documents that change and jobs that stop: a document's version (on its row, its chunk rows
and their postings), the replacement being indexed, the versions retired by a swap whose
vectors are still to be removed, a job's cancellation, and ingest's idempotency keys.

Columns are added only where missing, like 0001's tables, so a registry whose tables were
made by create_all before migrations joins without being rebuilt.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None

# The unique constraint that lets two versions of a document hold chunks at once.
CHUNK_POSITION = "uq_chunks_document_version_index"


def _version() -> sa.Column[int]:
    return sa.Column("version", sa.Integer(), nullable=False, server_default=sa.text("1"))


def _columns(table: str) -> set[str]:
    return {column["name"] for column in sa.inspect(op.get_bind()).get_columns(table)}


def upgrade() -> None:
    bind = op.get_bind()
    if "version" not in _columns("documents"):
        op.add_column("documents", _version())
    if "version" not in _columns("lexical_postings"):
        op.add_column("lexical_postings", _version())
    if "cancel_requested" not in _columns("jobs"):
        op.add_column(
            "jobs",
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        )
    uniques = sa.inspect(bind).get_unique_constraints("chunks")
    if not any(unique["name"] == CHUNK_POSITION for unique in uniques):
        if bind.dialect.name == "sqlite":
            # SQLite changes a constraint only by copying the table; the reflected constraint
            # has no name, so the convention gives it one to drop.
            with op.batch_alter_table(
                "chunks",
                recreate="always",
                naming_convention={"uq": "uq_%(table_name)s_%(column_0_N_name)s"},
            ) as batch:
                if "version" not in _columns("chunks"):
                    batch.add_column(_version())
                batch.drop_constraint("uq_chunks_document_id_chunk_index", type_="unique")
                batch.create_unique_constraint(
                    CHUNK_POSITION, ["document_id", "version", "chunk_index"]
                )
        else:
            if "version" not in _columns("chunks"):
                op.add_column("chunks", _version())
            op.drop_constraint("chunks_document_id_chunk_index_key", "chunks", type_="unique")
            op.create_unique_constraint(
                CHUNK_POSITION, "chunks", ["document_id", "version", "chunk_index"]
            )
    existing = set(sa.inspect(bind).get_table_names())
    if "document_replacements" not in existing:
        op.create_table(
            "document_replacements",
            sa.Column("document_id", sa.String(64), primary_key=True),
            sa.Column("tenant", sa.String(256), nullable=False),
            sa.Column("job_id", sa.String(64), nullable=False),
            sa.Column("version", sa.Integer(), nullable=False),
            sa.Column("sha256", sa.String(64), nullable=False),
            sa.Column("title", sa.Text(), nullable=False),
            sa.Column("filename", sa.Text()),
            sa.Column("media_type", sa.String(128), nullable=False),
            sa.Column("size_bytes", sa.Integer(), nullable=False),
            sa.Column("original_key", sa.String(128), nullable=False),
            sa.Column("extracted_key", sa.String(128), nullable=False),
            sa.Column("metadata", sa.JSON(), nullable=False),
            sa.Column("created_at", sa.DateTime(), nullable=False),
        )
        op.create_index("ix_document_replacements_job", "document_replacements", ["job_id"])
    if "retired_versions" not in existing:
        op.create_table(
            "retired_versions",
            sa.Column("document_id", sa.String(64), primary_key=True),
            sa.Column("version", sa.Integer(), primary_key=True),
            sa.Column("tenant", sa.String(256), nullable=False),
            sa.Column("chunk_count", sa.Integer(), nullable=False),
            sa.Column("original_key", sa.String(128), nullable=False),
            sa.Column("extracted_key", sa.String(128), nullable=False),
        )
    if "idempotency_keys" not in existing:
        op.create_table(
            "idempotency_keys",
            sa.Column("tenant", sa.String(256), primary_key=True),
            sa.Column("key", sa.String(255), primary_key=True),
            sa.Column("fingerprint", sa.String(64), nullable=False),
            sa.Column("status_code", sa.Integer()),
            sa.Column("response", sa.Text()),
            sa.Column("created_at", sa.DateTime(), nullable=False),
        )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("retired_versions")
    op.drop_index("ix_document_replacements_job", "document_replacements")
    op.drop_table("document_replacements")
    with op.batch_alter_table("chunks", recreate="auto") as batch:
        batch.drop_constraint(CHUNK_POSITION, type_="unique")
        batch.create_unique_constraint(
            "chunks_document_id_chunk_index_key", ["document_id", "chunk_index"]
        )
        batch.drop_column("version")
    op.drop_column("jobs", "cancel_requested")
    op.drop_column("lexical_postings", "version")
    op.drop_column("documents", "version")
