"""The event log of jobs and documents (impl/rag/events.py).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_events",
        # SQLite: AUTOINCREMENT, so that an id is never used again once its row is removed.
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("tenant", sa.String(256), nullable=False),
        sa.Column("job_id", sa.String(64)),
        sa.Column("document_id", sa.String(64)),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_job_events_job", "job_events", ["job_id", "id"])
    op.create_index("ix_job_events_tenant", "job_events", ["tenant", "id"])
    op.create_index("ix_job_events_created", "job_events", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_job_events_created", table_name="job_events")
    op.drop_index("ix_job_events_tenant", table_name="job_events")
    op.drop_index("ix_job_events_job", table_name="job_events")
    op.drop_table("job_events")
