"""The event log: what happened to jobs and documents, one row per event, written in the
transaction that makes the change it reports. Any process (an API process serving a stream, on
any machine) learns of a change by reading the log after the last id it has seen, so the events
of a job that a ``ragapi worker`` elsewhere runs reach every subscriber.

Ids only grow, and become visible in their order: on PostgreSQL a transaction that writes an
event first takes one advisory lock (held to its commit), so that a reader never sees id n+1
committed while id n is still to come (and would skip it); SQLite runs one write transaction at
a time anyway. Events older than the retention are removed whenever a job finishes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast, get_args

from sqlalchemy import BigInteger, Index, Integer, String, delete, func, insert, or_, select
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from impl.db import Base, Database, utcnow
from impl.rag.tables import JobRow
from impl.rag.types import FINISHED_JOB_STATUSES

EventType = Literal[
    "job.queued",
    "job.running",
    "job.progress",
    "document.ready",
    "document.failed",
    "document.updated",
    "document.deleted",
    "job.finished",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
# The last event of every job: its data's status is succeeded, failed or cancelled.
FINISHED: EventType = "job.finished"
DEFAULT_RETENTION = timedelta(days=7)
_EVENT_LOCK = 0x72616765  # "rage": pg_advisory_xact_lock key of the event writers


class EventRow(Base):
    __tablename__ = "job_events"
    # SQLite: AUTOINCREMENT, so that an id is never used again once its row is removed.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    tenant: Mapped[str] = mapped_column(String(256))
    job_id: Mapped[str | None] = mapped_column(String(64))
    document_id: Mapped[str | None] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    __table_args__ = (
        Index("ix_job_events_job", "job_id", "id"),
        Index("ix_job_events_tenant", "tenant", "id"),
        Index("ix_job_events_created", "created_at"),
        {"sqlite_autoincrement": True},
    )


@dataclass(frozen=True)
class Event:
    id: int | None  # None: made from a finished job whose own events the log no longer holds
    type: EventType
    job_id: str | None
    document_id: str | None
    created_at: datetime
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobEvents:
    """A job's events after some id, oldest first; ``finished``: none will follow them."""

    events: list[Event]
    finished: bool


def event_of(row: EventRow) -> Event:
    return Event(
        id=row.id,
        type=cast(EventType, row.type),
        job_id=row.job_id,
        document_id=row.document_id,
        created_at=row.created_at,
        data=dict(row.data),
    )


class EventLog:
    """The registry's event log (a part of ``Registry``)."""

    _db: Database
    _event_retention: timedelta

    def _record_event(
        self,
        session: Session,
        tenant: str,
        event_type: EventType,
        *,
        job_id: str | None = None,
        document_id: str | None = None,
        **data: Any,
    ) -> None:
        """Add an event to the transaction of ``session`` (best as its last statement: on
        PostgreSQL the lock it takes is held to the commit)."""
        if not self._db.is_sqlite:
            session.execute(select(func.pg_advisory_xact_lock(_EVENT_LOCK)))
        now = utcnow()
        session.execute(
            insert(EventRow).values(
                tenant=tenant,
                job_id=job_id,
                document_id=document_id,
                type=event_type,
                data=data,
                created_at=now,
            )
        )
        if event_type == FINISHED:
            session.execute(
                delete(EventRow).where(EventRow.created_at < now - self._event_retention)
            )

    def _record_job_event(
        self,
        session: Session,
        job_id: str,
        event_type: EventType,
        *,
        document_id: str | None = None,
        **data: Any,
    ) -> None:
        """An event of the job ``job_id``, in its tenant."""
        tenant = session.scalar(select(JobRow.tenant).where(JobRow.id == job_id))
        if tenant is not None:
            self._record_event(
                session, tenant, event_type, job_id=job_id, document_id=document_id, **data
            )

    def job_events(self, tenant: str, job_id: str, *, after: int, limit: int) -> JobEvents | None:
        """The job's events with ids above ``after``, at most ``limit``; None when the tenant
        has no such job. A finished job whose ``job.finished`` the log no longer holds (past
        the retention, or older than the log) gets one made from its row, without an id."""
        with self._db.read() as session:
            # The job first: if it has finished, its finished event was committed with it and
            # the read below finds it.
            job = session.get(JobRow, job_id)
            if job is None or job.tenant != tenant:
                return None
            rows = session.scalars(
                select(EventRow)
                .where(EventRow.job_id == job_id, EventRow.id > after)
                .order_by(EventRow.id)
                .limit(limit)
            ).all()
            events = [event_of(row) for row in rows]
            if job.status not in FINISHED_JOB_STATUSES or len(rows) == limit:
                return JobEvents(events, finished=False)
            logged = session.scalar(
                select(EventRow.id).where(EventRow.job_id == job_id, EventRow.type == FINISHED)
            )
            if logged is None:
                data: dict[str, Any] = {"status": job.status}
                if job.error_title is not None:
                    data["error"] = {"title": job.error_title, "detail": job.error_detail or ""}
                events.append(Event(None, FINISHED, job_id, None, job.updated_at, data))
            return JobEvents(events, finished=True)

    def tenant_events(
        self,
        tenant: str,
        *,
        after: int,
        job_ids: Collection[str],
        documents: bool,
        limit: int,
        up_to: int | None = None,
    ) -> list[Event]:
        """The tenant's events with ids above ``after`` (and at most ``up_to``), oldest first:
        those of ``job_ids``, and with ``documents`` every ``document.*`` event."""
        wanted: list[ColumnElement[bool]] = []
        if job_ids:
            wanted.append(EventRow.job_id.in_(list(job_ids)))
        if documents:
            wanted.append(EventRow.type.startswith("document."))
        if not wanted:
            return []
        query = select(EventRow).where(EventRow.tenant == tenant, EventRow.id > after, or_(*wanted))
        if up_to is not None:
            query = query.where(EventRow.id <= up_to)
        with self._db.read() as session:
            rows = session.scalars(query.order_by(EventRow.id).limit(limit))
            return [event_of(row) for row in rows]

    def last_event_id(self) -> int:
        """The newest event's id; 0 when the log is empty."""
        with self._db.read() as session:
            return session.scalar(select(func.max(EventRow.id))) or 0
