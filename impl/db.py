"""The one database module: the engine for a URL, sessions, the schema's migrations, the
declarative base and column types, and the pagination cursor codec, for everything that keeps
rows in SQL (the RAG registry and lexical index, the API keys).

SQLite by default, PostgreSQL by URL; queries stay portable, so nothing SQLite-only happens
outside the connection set-up here.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Dialect,
    Engine,
    TypeDecorator,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

if TYPE_CHECKING:
    from alembic.config import Config

from impl.dependencies import Dependency
from impl.errors import ConfigurationError, InvalidInput

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
UPGRADE_COMMAND = "ragapi db upgrade"
# The newest migration's revision (tests/test_db.py holds it to alembic's head): a database at
# it needs nothing, and finding that out needs no alembic.
SCHEMA_HEAD = "0008"
# A server that does not accept a connection within this is down: requests get a 503 instead
# of waiting for the operating system's TCP timeout (minutes).
CONNECT_TIMEOUT_SECONDS = 5
# Held (pg_advisory_xact_lock) while migrations run, so that processes starting at once on a
# fresh PostgreSQL migrate one after the other instead of racing on CREATE TABLE.
_MIGRATION_LOCK = 0x72616761  # "raga"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, stored naive: SQLite keeps no zone and
    the same column must compare alike on every backend."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Every table of the database; the migrations (impl/migrations) build exactly these."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, dict[str, Any]: JSON}


def encode_cursor(payload: dict[str, Any]) -> str:
    """An opaque page cursor: the last item's sort key, as unpadded URL-safe base64 JSON."""
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        payload = json.loads(raw)
    except (binascii.Error, ValueError):
        payload = None
    if not isinstance(payload, dict):
        raise InvalidInput("the cursor is not valid")
    return payload


def encode_time_cursor(created_at: datetime, item_id: str) -> str:
    """The cursor of a newest-first page that ended with the item created at ``created_at``."""
    return encode_cursor({"t": created_at.isoformat(), "i": item_id})


def decode_time_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a newest-first page ended with, from its cursor."""
    payload = decode_cursor(cursor)
    created, item_id = payload.get("t"), payload.get("i")
    if not isinstance(created, str) or not isinstance(item_id, str):
        raise InvalidInput("the cursor is not valid")
    try:
        when = datetime.fromisoformat(created)
    except ValueError:
        raise InvalidInput("the cursor is not valid") from None
    if when.tzinfo is None:
        raise InvalidInput("the cursor is not valid")
    return when, item_id


def _prepare_sqlite(engine: Engine) -> None:
    """WAL (readers never wait for the writer), a busy timeout, foreign keys, and explicit
    BEGIN statements: pysqlite's implicit transactions would start every write transaction as a
    reader that later fails to upgrade under concurrency instead of waiting for the lock."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """One engine and its sessions. Shared by every user of the same URL in a process (see
    ``open_database``); each method's session is one unit of work, safe to use from threads."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite and parsed.database not in (None, "", ":memory:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = (
            {"timeout": 30} if self.is_sqlite else {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
        )
        self.dependency = Dependency(
            "registry", f"registry {parsed.render_as_string(hide_password=True)}"
        )
        try:
            # Pre-ping: a server restarted under a pooled connection costs a reconnect, not a
            # failed request.
            self.engine = create_engine(
                url, connect_args=connect_args, pool_pre_ping=not self.is_sqlite
            )
        except ModuleNotFoundError as exc:
            raise ConfigurationError(
                f"no driver for the registry URL's dialect ({parsed.drivername}): {exc}; "
                "use sqlite:/// or postgresql+psycopg://"
            ) from None
        if self.is_sqlite:
            _prepare_sqlite(self.engine)
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: take the write lock up front, so concurrent writers queue on the busy timeout.
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._writes = sessionmaker(self._write_engine, expire_on_commit=False)
        self._users = 0
        self._schema_checked = False

    def close(self) -> None:
        """Give back one ``open_database``; the last user's close disposes the engine."""
        with _OPEN.lock:
            self._users -= 1
            if self._users > 0:
                return
            if _OPEN.by_url.get(self.url) is self:
                del _OPEN.by_url[self.url]
        self.engine.dispose()

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """A database that cannot be reached (refused, dropped, shut down, SQLite's file
        locked past its busy timeout) is the registry being down, not a bug of the request:
        DependencyUnavailable. Pre-ping has already replaced connections that died in the
        pool, so a failure here is the server's, and the next call reconnects."""
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            raise self.dependency.failed(exc) from None
        self.dependency.answered()

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reaching(), self._reads() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._reaching(), self._writes() as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.read() as session:
            session.execute(select(1))

    # -- schema -------------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Apply the migrations the database lacks, one process at a time."""
        from alembic import command
        from alembic.util import CommandError

        with self._write_engine.begin() as connection:
            if not self.is_sqlite:
                connection.execute(select(func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
            config = alembic_config()
            config.attributes["connection"] = connection
            try:
                command.upgrade(config, "head")
            except CommandError as exc:
                raise ConfigurationError(f"the registry cannot be upgraded: {exc}") from None
        self._schema_checked = True

    def revision(self) -> str | None:
        """The migration the database is at; None when it has none (new, or made before
        migrations). Read with plain SQL: a database already at SCHEMA_HEAD, the usual case at
        every start and CLI command, costs no import of alembic."""
        with self.engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return None
            version = connection.execute(text("SELECT version_num FROM alembic_version"))
            found: str | None = version.scalar()
            return found

    def ensure_schema(self, *, upgrade: bool) -> None:
        """Upgrade the schema (``upgrade``), or refuse a database whose schema is not the one
        this code uses, naming the command that upgrades it."""
        if self._schema_checked:
            return
        current = self.revision()
        if current == SCHEMA_HEAD:
            self._schema_checked = True
            return
        if upgrade:
            self.upgrade()
            return
        from alembic.script import ScriptDirectory

        known = {
            script.revision
            for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()
        }
        if current is not None and current not in known:
            raise ConfigurationError(
                f"the registry's schema ({current}) was made by a newer ragapi than this "
                f"one (which knows up to {SCHEMA_HEAD})"
            )
        raise ConfigurationError(
            f"the registry's schema is at {current or 'no migration'}, older than this "
            f"server's ({SCHEMA_HEAD}); run `{UPGRADE_COMMAND}` with the same RAGAPI_REGISTRY_URL"
        )


def alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


class _Open:
    """The databases open in this process, by URL, with how many users hold each."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_url: dict[str, Database] = {}


# One engine per URL per process: the registry and the key store share a pool (and SQLite's
# pragmas) instead of each opening its own. Process state by nature, like the pool it holds.
_OPEN = _Open()


def open_database(url: str) -> Database:
    """The process's database for ``url``, opened on first use; give it back with
    ``Database.close`` (the engine is disposed when its last user does)."""
    with _OPEN.lock:
        database = _OPEN.by_url.get(url)
        if database is None:
            database = _OPEN.by_url[url] = Database(url)
        database._users += 1
        return database
