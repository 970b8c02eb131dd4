"""The registry: documents, ingestion jobs, chunk rows, vector spaces and store-wide facts, in
SQL.

SQLite by default, PostgreSQL by URL (the engine, sessions and schema are impl/db.py's). Each
concern is a module of its own (documents.py, job_queue.py, chunk_rows.py, idempotency.py,
spaces.py, events.py); ``Registry`` is all of them on one database. Every method is one unit of
work in its own session, which makes the class safe to share between threads.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from impl.db import Database, open_database
from impl.rag import lexical
from impl.rag.chunk_rows import Chunks
from impl.rag.documents import Documents
from impl.rag.events import DEFAULT_RETENTION
from impl.rag.idempotency import IdempotencyKeys
from impl.rag.job_queue import JobRows
from impl.rag.spaces import VectorSpaces
from impl.rag.tables import ChunkRow, DocumentRow, JobRow, MetaRow, chunk_from_row
from impl.rag.types import StoreCounts


class Registry(Documents, JobRows, Chunks, IdempotencyKeys, VectorSpaces):
    def __init__(
        self, url: str, *, upgrade: bool, event_retention: timedelta = DEFAULT_RETENTION
    ) -> None:
        """The registry at ``url``; ``upgrade``: apply the migrations it lacks, else refuse a
        schema older than this code's (see ``Database.ensure_schema``). Events older than
        ``event_retention`` are removed as jobs finish."""
        self._event_retention = event_retention
        self._db = open_database(url)
        try:
            self._db.ensure_schema(upgrade=upgrade)
            self._index_earlier_chunks()
        except BaseException:
            self._db.close()
            raise

    def _index_earlier_chunks(self) -> None:
        """Once per registry: index the chunks stored before the lexical index existed (from
        then on, every chunk row is indexed in the transaction that writes it)."""
        try:
            with self._db.write() as session:
                # Claimed first: of several processes starting at once, one indexes.
                session.add(MetaRow(key="lexical_index", value="bm25"))
                session.flush()
                rows = session.scalars(select(ChunkRow).order_by(ChunkRow.tenant)).all()
                for tenant in {row.tenant for row in rows}:
                    chunks = [chunk_from_row(row) for row in rows if row.tenant == tenant]
                    lexical.index_chunks(session, tenant, chunks)
        except IntegrityError:
            return  # indexed already, or by the process that claimed it first

    @property
    def database(self) -> Database:
        """The registry's database, for stores kept in it too (originals)."""
        return self._db

    def close(self) -> None:
        self._db.close()

    def ping(self) -> None:
        self._db.ping()

    def counts(self) -> StoreCounts:
        """What every tenant holds, for the metrics: documents and jobs by status, and the
        chunks of ready documents."""
        with self._db.read() as session:
            documents = session.execute(
                select(DocumentRow.status, func.count()).group_by(DocumentRow.status)
            )
            jobs = session.execute(select(JobRow.status, func.count()).group_by(JobRow.status))
            chunks = session.scalar(
                select(func.coalesce(func.sum(DocumentRow.chunk_count), 0)).where(
                    DocumentRow.status == "ready"
                )
            )
            return StoreCounts(
                documents={status: n for status, n in documents},
                jobs={status: n for status, n in jobs},
                chunks=int(chunks or 0),
            )
