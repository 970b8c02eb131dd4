"""The lexical index's impact order and document frequencies: each posting's impact (its BM25
saturation at a fixed chunk length, impl/rag/lexical.py) and an index that holds each term's
postings best first, so that a search reads a term's best postings instead of all of them;
and a table of how many chunks hold each term, so that a search reads that instead of counting
a term's postings. Both are filled here from the existing postings.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None

INDEX = "ix_lexical_postings_impact"


def upgrade() -> None:
    op.add_column(
        "lexical_postings",
        sa.Column("impact", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    postings = sa.table(
        "lexical_postings",
        sa.column("frequency", sa.Integer()),
        sa.column("chunk_terms", sa.Integer()),
        sa.column("impact", sa.Integer()),
    )
    # lexical.impact() as it was when this migration was written: k1 1.2, b 0.75, a reference
    # length of 64 terms, in units of 1/10,000, rounded half up.
    number: sa.Double[float] = sa.Double()
    frequency = sa.cast(postings.c.frequency, number)
    length = 0.25 + 0.75 * sa.cast(postings.c.chunk_terms, number) / 64.0
    half_up: sa.ColumnElement[float] = 10000.0 * frequency * 2.2 / (frequency + 1.2 * length) + 0.5
    # SQLite's CAST truncates, PostgreSQL's rounds: FLOOR there.
    if op.get_bind().dialect.name != "sqlite":
        half_up = sa.func.floor(half_up)
    op.execute(postings.update().values(impact=sa.cast(half_up, sa.Integer())))
    op.create_index(
        INDEX,
        "lexical_postings",
        ["tenant", "term", "impact", "chunk_id", "document_id", "version"],
    )
    op.create_table(
        "lexical_terms",
        sa.Column("tenant", sa.String(256), primary_key=True),
        sa.Column("term", sa.String(64), primary_key=True),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sqlite_with_rowid=False,
    )
    op.execute(
        "INSERT INTO lexical_terms (tenant, term, chunks)"
        " SELECT tenant, term, COUNT(*) FROM lexical_postings GROUP BY tenant, term"
    )


def downgrade() -> None:
    op.drop_table("lexical_terms")
    op.drop_index(INDEX, table_name="lexical_postings")
    with op.batch_alter_table("lexical_postings") as batch:
        batch.drop_column("impact")
