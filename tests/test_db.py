"""The database module: the schema as migrations on SQLite and PostgreSQL, registries made
before migrations existed, the refusal of an older schema, concurrent upgrades, and one engine
per URL for the registry and the keys."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from impl.db import SCHEMA_HEAD, Base, alembic_config, open_database
from impl.errors import ConfigurationError
from impl.rag import lexical, webhooks  # noqa: F401  (its table is Base's)
from impl.rag.registry import Registry
from impl.security.keys import CreatedKey, SqlKeyStore
from impl.settings import Settings
from tests.conftest import ROOT, Postgres

HEAD = SCHEMA_HEAD


def test_the_schema_head_is_the_newest_migration() -> None:
    """Start-up reads the version with plain SQL and compares it with SCHEMA_HEAD, so that
    constant must name the migration alembic would apply last."""
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == SCHEMA_HEAD


def settings_for(url: str, **overrides: object) -> Settings:
    return Settings(_env_file=None, registry_url=url, **overrides)  # type: ignore[call-arg]


def ragapi_db_upgrade(url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "impl.cli", "db", "upgrade"],
        cwd=ROOT,
        env={**os.environ, "RAGAPI_REGISTRY_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def migrate_to(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def test_the_migrations_build_exactly_the_models_tables(registry_url: str) -> None:
    database = open_database(registry_url)
    try:
        database.upgrade()
        assert database.revision() == HEAD
        with database.engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert differences == []
    finally:
        database.close()


def build_registry_before_migrations(url: str) -> None:
    """What the code before migrations left: its tables by create_all (the lexical index's
    missing, as in a registry last opened before that index existed; the tables of later
    migrations did not exist yet), schema_version "1", and a ready document with one chunk."""
    engine = create_engine(url)
    try:
        # The lexical index's tables and those later migrations add.
        later = (
            "lexical_postings",
            "lexical_terms",
            "lexical_stats",
            "conversations",
            "conversation_turns",
            "originals",
            "job_events",
            "webhooks",
        )
        before_lexical = [table for table in Base.metadata.sorted_tables if table.name not in later]
        Base.metadata.create_all(engine, tables=before_lexical)
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO meta VALUES ('schema_version', '1')"))
            connection.execute(
                text(
                    "INSERT INTO documents (id, tenant, title, filename, media_type, size_bytes,"
                    " sha256, original_key, extracted_key, chunk_count, status, error, metadata,"
                    " created_at, updated_at) VALUES ('doc_old', 't', 'Old', NULL, 'text/plain',"
                    " 5, 'abc', 'k1', 'k2', 1, 'ready', NULL, '{}', :now, :now)"
                ),
                {"now": "2026-01-01 00:00:00"},
            )
            connection.execute(
                text(
                    "INSERT INTO chunks (id, document_id, tenant, chunk_index, text, page,"
                    " start_char, end_char) VALUES ('doc_old-0', 'doc_old', 't', 0,"
                    " 'the zeppelin moored at dawn', NULL, 0, 27)"
                )
            )
    finally:
        engine.dispose()


def test_a_registry_made_before_migrations_joins_them_intact(registry_url: str) -> None:
    build_registry_before_migrations(registry_url)
    registry = Registry(registry_url, upgrade=True)
    try:
        document = registry.get_document("t", "doc_old")
        assert document is not None and document.status == "ready"
        [hit] = registry.lexical_search(
            "t", "zeppelin", limit=5, document_ids=None, exclude_documents=(), only_versions={}
        )
        assert (hit.chunk_id, hit.version) == ("doc_old-0", 1)
    finally:
        registry.close()
    engine = create_engine(registry_url)
    try:
        with engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == HEAD
            assert (
                connection.execute(
                    text("SELECT count(*) FROM meta WHERE key = 'schema_version'")
                ).scalar()
                == 0
            )
    finally:
        engine.dispose()


def test_a_server_refuses_an_older_schema_and_names_the_command(postgres_url: str) -> None:
    settings = settings_for(postgres_url)
    assert not settings.registry_upgrades_on_start  # a server's schema is upgraded by command
    with pytest.raises(ConfigurationError, match="run `ragapi db upgrade`"):
        SqlKeyStore(settings)  # a new, empty database
    migrate_to(postgres_url, "0001")
    with pytest.raises(ConfigurationError, match="at 0001, older than this server's"):
        Registry(postgres_url, upgrade=False)

    upgrade = ragapi_db_upgrade(postgres_url)
    output, _ = upgrade.communicate(timeout=120)
    assert upgrade.returncode == 0, output
    assert f"registry schema at {HEAD}" in output

    Registry(postgres_url, upgrade=False).close()
    SqlKeyStore(settings).close()


def test_ragapi_serve_on_an_older_schema_stops_and_names_the_command(
    postgres_url: str, tmp_path: Path
) -> None:
    served = subprocess.run(
        [sys.executable, "-m", "impl.cli", "serve", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "RAGAPI_REGISTRY_URL": postgres_url, "RAGAPI_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode == 2
    assert "run `ragapi db upgrade` with the same RAGAPI_REGISTRY_URL" in served.stderr
    assert "Traceback" not in served.stderr


def test_a_schema_newer_than_the_code_is_refused(postgres_url: str) -> None:
    migrate_to(postgres_url, HEAD)
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    with pytest.raises(ConfigurationError, match="newer ragapi"):
        Registry(postgres_url, upgrade=False)
    with pytest.raises(ConfigurationError, match="cannot be upgraded"):
        Registry(postgres_url, upgrade=True)


@pytest.fixture
def fresh_databases(postgres: Postgres) -> Iterator[list[str]]:
    names = [postgres.create_database() for _ in range(3)]
    yield [postgres.url(name) for name in names]
    for name in names:
        postgres.execute(f"DROP DATABASE {name} WITH (FORCE)")


# What a server process does with the registry at start, RAGAPI_REGISTRY_AUTO_UPGRADE=true.
OPEN_AND_UPGRADE = """
import sys
from impl.rag import lexical
from impl.rag.registry import Registry
from impl.security.keys import SqlKeyStore
from impl.settings import Settings
registry = Registry(sys.argv[1], upgrade=True)
registry.record_default_model("model-a", 384)
registry.close()
SqlKeyStore(Settings(registry_url=sys.argv[1], registry_auto_upgrade=True)).close()
"""


def test_processes_upgrading_a_fresh_postgresql_at_once_all_succeed(
    fresh_databases: list[str],
) -> None:
    """Six processes at once on each of three new databases, half `ragapi db upgrade`, half
    opening the registry and the keys with upgrades on: the migration lock makes them take
    turns, so none fails on tables another is creating."""
    for url in fresh_databases:
        processes = [
            ragapi_db_upgrade(url)
            if n % 2
            else subprocess.Popen(
                [sys.executable, "-c", OPEN_AND_UPGRADE, url],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for n in range(6)
        ]
        outputs = [process.communicate(timeout=300)[0] for process in processes]
        assert [p.returncode for p in processes] == [0] * 6, "\n".join(outputs)
        registry = Registry(url, upgrade=False)
        registry.close()


def test_the_keys_and_the_registry_survive_a_postgresql_restart(
    postgres: Postgres, postgres_url: str
) -> None:
    """Pooled connections die with the server; pre-ping replaces them, so the first request
    after a restart is served, not failed."""
    settings = settings_for(postgres_url, registry_auto_upgrade=True)
    keys = SqlKeyStore(settings)
    registry = Registry(postgres_url, upgrade=True)
    try:
        secret = keys.create("t", "k", ["read"]).secret
        assert keys.verify(secret) is not None
        registry.record_default_model("model-a", 384)
        postgres.restart()
        assert keys.verify(secret) is not None
        assert registry.list_documents("t", limit=5, cursor=None).items == []
    finally:
        registry.close()
        keys.close()


def test_the_registry_and_the_keys_share_one_engine(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    registry = Registry(url, upgrade=True)
    keys = SqlKeyStore(settings_for(url))
    try:
        assert registry._db is keys._db
        assert open_database(url) is registry._db
        registry._db.close()
    finally:
        keys.close()
        registry.close()
    # The last user gone, the next one opens a new engine.
    reopened = open_database(url)
    assert reopened is not registry._db
    reopened.close()


def test_servers_starting_at_once_on_an_empty_database_make_one_admin_key(
    registry_url: str,
) -> None:
    """Eight first starts at once (threads here, machines in production): one admin key is
    made and shown, not one per server."""
    settings = settings_for(registry_url, registry_auto_upgrade=True)
    SqlKeyStore(settings).close()  # the schema, as the first server's start makes it
    stores = [SqlKeyStore(settings) for _ in range(8)]
    start = threading.Barrier(len(stores))

    def first_start(store: SqlKeyStore) -> CreatedKey | None:
        store.list("default", limit=1, cursor=None)  # connected, as a started server is
        start.wait()
        return store.create_first("default", "bootstrap admin", ["admin"])

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            created = [key for key in pool.map(first_start, stores) if key is not None]
        listed, _ = stores[0].list("default", limit=100, cursor=None)
    finally:
        for store in stores:
            store.close()
    assert len(created) == 1
    assert [key.id for key in listed] == [created[0].key.id]


def test_0006_gives_existing_postings_their_impact_and_their_terms_counts(
    registry_url: str,
) -> None:
    """A lexical index written before impacts (0005): the upgrade computes each posting's
    impact as the code does, counts the chunks that hold each term, and searches find the
    chunks with their BM25."""
    migrate_to(registry_url, "0005")
    # (chunk, term, frequency, chunk length): a short chunk and a long one.
    postings = [
        ("doc_a-0", "zeppelin", 1, 3),
        ("doc_a-0", "moor", 2, 3),
        ("doc_a-1", "zeppelin", 3, 120),
        ("doc_a-1", "dawn", 1, 120),
    ]
    engine = create_engine(registry_url)
    try:
        with engine.begin() as connection:
            for chunk_id, term, frequency, length in postings:
                connection.execute(
                    text(
                        "INSERT INTO lexical_postings (tenant, term, chunk_id, document_id,"
                        " version, frequency, chunk_terms) VALUES ('t', :term, :chunk_id,"
                        " 'doc_a', 1, :frequency, :length)"
                    ),
                    {"term": term, "chunk_id": chunk_id, "frequency": frequency, "length": length},
                )
            connection.execute(text("INSERT INTO lexical_stats VALUES ('t', 2, 123)"))
    finally:
        engine.dispose()
    migrate_to(registry_url, "head")
    engine = create_engine(registry_url)
    try:
        with engine.connect() as connection:
            impacts = dict(
                connection.execute(
                    text("SELECT chunk_id || ' ' || term, impact FROM lexical_postings")
                ).all()
            )
            counts = dict(connection.execute(text("SELECT term, chunks FROM lexical_terms")).all())
    finally:
        engine.dispose()
    assert impacts == {
        f"{chunk_id} {term}": lexical.impact(frequency, length)
        for chunk_id, term, frequency, length in postings
    }
    assert counts == {"zeppelin": 2, "moor": 1, "dawn": 1}
    registry = Registry(registry_url, upgrade=False)
    try:
        hits = registry.lexical_search(
            "t", "zeppelin dawn", limit=5, document_ids=None, exclude_documents=(), only_versions={}
        )
        assert [hit.chunk_id for hit in hits] == ["doc_a-1", "doc_a-0"]
    finally:
        registry.close()
