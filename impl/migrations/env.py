"""Alembic's entry point: migrations run on the connection impl/db.py hands over, inside its
transaction (which holds the migration lock on PostgreSQL)."""

from __future__ import annotations

from alembic import context

from impl.db import Base
from impl.rag import conversations, events, lexical, tables, webhooks  # noqa: F401  (their tables are Base's)
from impl.security import keys  # noqa: F401

context.configure(connection=context.config.attributes["connection"], target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
