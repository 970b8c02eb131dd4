"""The schema's version is Alembic's now (alembic_version): drop the row that recorded it
before migrations existed.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(sa.text("DELETE FROM meta WHERE key = 'schema_version'"))


def downgrade() -> None:
    op.execute(sa.text("INSERT INTO meta (key, value) VALUES ('schema_version', '1')"))
