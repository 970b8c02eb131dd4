"""Idempotency keys of ingest requests (the IETF draft "The Idempotency-Key HTTP Header
Field"): the first request with a key claims it with its body's fingerprint, and its response
is recorded; a retry with the same key and body gets that response again, with another body a
refusal. Keys are forgotten ``ttl`` after their first use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Integer, String, Text, and_, delete, or_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from impl.db import Base, Database, utcnow
from impl.errors import Conflict, IdempotencyKeyReused


class IdempotencyRow(Base):
    __tablename__ = "idempotency_keys"
    tenant: Mapped[str] = mapped_column(String(256), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    # Both None while the first request is being answered.
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]


@dataclass(frozen=True)
class RecordedResponse:
    status_code: int
    body: str


class IdempotencyKeys:
    """The registry's idempotency keys (a part of ``Registry``)."""

    _db: Database

    def claim_idempotency_key(
        self, tenant: str, key: str, fingerprint: str, *, ttl: timedelta, in_flight: timedelta
    ) -> RecordedResponse | None:
        """None: the key is the caller's now, to answer and then ``record_response`` (or
        ``release_idempotency_key`` on failure). Else the first request's response. Conflict
        while the first request is still being answered, IdempotencyKeyReused for another
        body. A key is forgotten ``ttl`` after its first use, and a first request still
        unanswered after ``in_flight`` counts as never answered (its process died)."""
        now = utcnow()
        try:
            with self._db.write() as session:
                # An expired key is forgotten first, so it can be claimed again.
                session.execute(
                    delete(IdempotencyRow).where(
                        IdempotencyRow.tenant == tenant,
                        IdempotencyRow.key == key,
                        or_(
                            IdempotencyRow.created_at < now - ttl,
                            and_(
                                IdempotencyRow.status_code.is_(None),
                                IdempotencyRow.created_at < now - in_flight,
                            ),
                        ),
                    )
                )
                session.add(
                    IdempotencyRow(tenant=tenant, key=key, fingerprint=fingerprint, created_at=now)
                )
            return None
        except IntegrityError:
            pass
        with self._db.read() as session:
            row = session.get(IdempotencyRow, (tenant, key))
            if row is None:
                raise Conflict("the Idempotency-Key is in use by a request being answered")
            if row.fingerprint != fingerprint:
                raise IdempotencyKeyReused(
                    "the Idempotency-Key was already used with another request body"
                )
            if row.status_code is None or row.response is None:
                raise Conflict(
                    "the first request with this Idempotency-Key is still being answered"
                )
            return RecordedResponse(row.status_code, row.response)

    def record_response(self, tenant: str, key: str, status_code: int, body: str) -> None:
        with self._db.write() as session:
            row = session.get(IdempotencyRow, (tenant, key))
            if row is not None:
                row.status_code = status_code
                row.response = body

    def release_idempotency_key(self, tenant: str, key: str) -> None:
        """The first request failed: a retry is a first request again."""
        with self._db.write() as session:
            session.execute(
                delete(IdempotencyRow).where(
                    IdempotencyRow.tenant == tenant, IdempotencyRow.key == key
                )
            )
