"""API keys: random secrets shown once, stored only as a SHA-256 hash beside a non-secret
prefix used to find the row, compared in constant time.

A key is ``rk_<prefix>_<secret>``. The secret has 256 bits of entropy, so a fast hash is
enough: a slow password hash protects guessable secrets, and these are not guessable.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, Protocol, cast

from sqlalchemy import JSON, DateTime, String, func, select, update
from sqlalchemy.orm import Mapped, mapped_column

from impl.db import Base, decode_cursor, encode_cursor, open_database
from impl.errors import InvalidInput, NotFound
from impl.settings import Settings

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
KEY_PREFIX = "rk_"


class KeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True, index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    rate_limits: Mapped[dict[str, str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    tenant: str
    scopes: list[Scope]
    rate_limits: dict[str, str]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the whole X-API-Key value; never stored


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def aware(moment: datetime | None) -> datetime | None:
    # SQLite drops the zone on the way back; every time stored here is UTC.
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def to_key(row: KeyRow) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        prefix=row.prefix,
        tenant=row.tenant,
        scopes=[cast(Scope, s) for s in row.scopes],
        rate_limits=dict(row.rate_limits),
        created_at=cast(datetime, aware(row.created_at)),
        revoked_at=aware(row.revoked_at),
    )


class VerifiedKeys:
    """Keys verified in the last `seconds`, by the SHA-256 of their secret (never the secret),
    at most `size` of them, least recently used out first. Only successes are kept: random
    secrets cannot fill it."""

    def __init__(self, seconds: float, size: int = 1024) -> None:
        self._seconds = seconds
        self._size = size
        self._keys: OrderedDict[str, tuple[ApiKey, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, secret_sha256: str) -> ApiKey | None:
        with self._lock:
            found = self._keys.get(secret_sha256)
            if found is None:
                return None
            key, until = found
            if time.monotonic() >= until:
                del self._keys[secret_sha256]
                return None
            self._keys.move_to_end(secret_sha256)
            return key

    def put(self, secret_sha256: str, key: ApiKey) -> None:
        if self._seconds <= 0:
            return
        with self._lock:
            self._keys[secret_sha256] = (key, time.monotonic() + self._seconds)
            self._keys.move_to_end(secret_sha256)
            while len(self._keys) > self._size:
                self._keys.popitem(last=False)

    def forget(self, key_id: str) -> None:
        with self._lock:
            for secret_sha256 in [h for h, (key, _) in self._keys.items() if key.id == key_id]:
                del self._keys[secret_sha256]


# Held while the first key is made (pg_advisory_xact_lock), so that one process makes it.
_FIRST_KEY_LOCK = 0x6B657973  # "keys"


def _new_key(
    tenant: str, name: str, scopes: list[Scope], rate_limits: dict[str, str] | None
) -> tuple[KeyRow, str]:
    """A new key's row and its secret, which only the row's hash keeps."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise InvalidInput(f"Scopes must be some of {', '.join(SCOPES)}.")
    # Hex, so the prefix holds no "_" and the first "_" after it ends it.
    prefix = f"{KEY_PREFIX}{secrets.token_hex(5)}"
    secret = f"{prefix}_{secrets.token_urlsafe(32)}"
    row = KeyRow(
        id=f"key_{uuid.uuid4().hex}",
        prefix=prefix,
        secret_sha256=digest(secret),
        name=name,
        tenant=tenant,
        scopes=sorted(set(scopes), key=SCOPES.index),
        rate_limits=dict(rate_limits or {}),
        created_at=datetime.now(UTC),
        revoked_at=None,
    )
    return row, secret


class KeyStore(Protocol):
    """What the web layer and the CLI need of the keys."""

    def create(
        self, tenant: str, name: str, scopes: list[Scope], rate_limits: dict[str, str] | None = None
    ) -> CreatedKey: ...

    def create_first(self, tenant: str, name: str, scopes: list[Scope]) -> CreatedKey | None:
        """A key made only if the store holds none, else None; exactly one of concurrent
        callers makes it."""
        ...

    def recall(self, presented: str) -> ApiKey | None:
        """The key this secret was verified as within the last key_cache_seconds, without
        asking the store; None when it was not."""
        ...

    def verify(self, presented: str) -> ApiKey | None:
        """The live key this secret belongs to, or None (unknown, malformed or revoked)."""
        ...

    def list(
        self, tenant: str, *, limit: int, cursor: str | None
    ) -> tuple[list[ApiKey], str | None]: ...

    def revoke(self, tenant: str, key_id: str) -> None: ...

    def close(self) -> None: ...


class SqlKeyStore:
    """The keys, in the registry's database (the process's one engine for it, impl/db.py)."""

    def __init__(self, settings: Settings) -> None:
        self._db = open_database(settings.resolved_registry_url)
        try:
            self._db.ensure_schema(upgrade=settings.registry_upgrades_on_start)
        except BaseException:
            self._db.close()
            raise
        self._verified = VerifiedKeys(settings.key_cache_seconds)

    def close(self) -> None:
        self._db.close()

    def create(
        self, tenant: str, name: str, scopes: list[Scope], rate_limits: dict[str, str] | None = None
    ) -> CreatedKey:
        row, secret = _new_key(tenant, name, scopes, rate_limits)
        with self._db.write() as session:
            session.add(row)
            session.flush()
            return CreatedKey(to_key(row), secret)

    def create_first(self, tenant: str, name: str, scopes: list[Scope]) -> CreatedKey | None:
        """A key made only if the store holds none, else None: of processes starting at once
        on an empty database (several machines, say), exactly one makes it. The check and the
        insert are one transaction that holds the database's write lock on SQLite (BEGIN
        IMMEDIATE) and a transaction-scoped advisory lock on PostgreSQL."""
        row, secret = _new_key(tenant, name, scopes, None)
        with self._db.write() as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(select(func.pg_advisory_xact_lock(_FIRST_KEY_LOCK)))
            if session.scalar(select(func.count()).select_from(KeyRow)):
                return None
            session.add(row)
            session.flush()
            return CreatedKey(to_key(row), secret)

    def recall(self, presented: str) -> ApiKey | None:
        """The key this secret verified as within the last key_cache_seconds, without a query;
        None when it has not (verify then answers)."""
        return self._verified.get(digest(presented))

    def verify(self, presented: str) -> ApiKey | None:
        """The live key this secret belongs to, or None (unknown, malformed or revoked)."""
        if not presented.startswith(KEY_PREFIX) or presented.count("_") < 2:
            return None
        prefix = presented[: presented.index("_", len(KEY_PREFIX))]
        presented_sha256 = digest(presented)
        with self._db.read() as session:
            row = session.scalars(select(KeyRow).where(KeyRow.prefix == prefix)).first()
            if row is None or row.revoked_at is not None:
                return None
            if not hmac.compare_digest(row.secret_sha256, presented_sha256):
                return None
            key = to_key(row)
        self._verified.put(presented_sha256, key)
        return key

    def list(
        self, tenant: str, *, limit: int, cursor: str | None
    ) -> tuple[list[ApiKey], str | None]:
        """Newest first; the cursor is the last key's (created_at, id)."""
        query = select(KeyRow).where(KeyRow.tenant == tenant)
        if cursor is not None:
            created, last_id = key_cursor(cursor)
            query = query.where(
                (KeyRow.created_at < created)
                | ((KeyRow.created_at == created) & (KeyRow.id < last_id))
            )
        query = query.order_by(KeyRow.created_at.desc(), KeyRow.id.desc()).limit(limit + 1)
        with self._db.read() as session:
            rows = list(session.scalars(query))
        keys = [to_key(r) for r in rows[:limit]]
        more = len(rows) > limit
        return keys, cursor_after(rows[limit - 1]) if more else None

    def revoke(self, tenant: str, key_id: str) -> None:
        """Revokes the key; a key already revoked stays as it was (revoking is idempotent, as
        a DELETE is), so its revoked_at keeps the first revocation's time."""
        with self._db.write() as session:
            done = session.execute(
                update(KeyRow)
                .where(KeyRow.id == key_id, KeyRow.tenant == tenant, KeyRow.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            if done.rowcount == 0 and not session.scalar(  # type: ignore[attr-defined]
                select(func.count())
                .select_from(KeyRow)
                .where(KeyRow.id == key_id, KeyRow.tenant == tenant)
            ):
                raise NotFound(f"key {key_id} not found")
        # Other processes (workers, the CLI's) learn of it when their cache entry expires.
        self._verified.forget(key_id)


def cursor_after(row: KeyRow) -> str:
    return encode_cursor({"t": cast(datetime, aware(row.created_at)).isoformat(), "i": row.id})


def key_cursor(cursor: str) -> tuple[datetime, str]:
    payload = decode_cursor(cursor)
    created, key_id = payload.get("t"), payload.get("i")
    if not isinstance(created, str) or not isinstance(key_id, str):
        raise InvalidInput("the cursor is not valid")
    try:
        return datetime.fromisoformat(created), key_id
    except ValueError:
        raise InvalidInput("the cursor is not valid") from None
