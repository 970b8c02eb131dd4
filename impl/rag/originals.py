"""Storage of uploaded originals (and of their extracted text), content-addressed by sha256,
where every process that ingests can read them: the API process stores an upload, any worker
on any machine chunks it.

Two stores, chosen by RAGAPI_ORIGINALS_URL: a folder (the default under the data directory, or
a volume every machine mounts), and the registry's database, whose rows are written in the
transaction that registers their document, so a crash can leave no unreferenced bytes behind.
The folder has no such transaction: ``sweep`` removes what a crash left there. No object store
(S3): no S3-compatible server runs where the tests run, so none is offered untested.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from impl.db import Database
from impl.dependencies import Dependency
from impl.errors import ConfigurationError
from impl.rag.tables import DocumentRow, OriginalRow, ReplacementRow
from impl.settings import Settings

_KEY = re.compile(r"[0-9a-f]{64}")
REGISTRY_URL = "registry://"
_SWEEP_BATCH = 500


def content_key(data: bytes) -> str:
    """The key under which ``data`` is stored: its sha256, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


class OriginalStore(Protocol):
    # True: the registry writes the bytes in the transaction that registers their document
    # (``Documents.register_ingest``'s contents) and removes them with its last user's row.
    written_with_documents: bool

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its key; storing the same bytes twice is a no-op."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; KeyError when there are none."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is a no-op."""
        ...

    def exists(self, key: str) -> bool: ...

    def check(self) -> None:
        """Raise DependencyUnavailable unless the store can be written (readiness)."""
        ...


class LocalOriginalStore:
    """A folder of files named by their sha256, fanned out as ``ab/cd/abcd…`` so that no one
    directory grows huge. Writes go to a temporary file in the target directory, are fsynced, then
    renamed into place, so a reader (or a crash) never sees half a file."""

    written_with_documents = False

    def __init__(self, root: Path) -> None:
        self._root = root
        self._root.mkdir(parents=True, exist_ok=True)
        self.dependency = Dependency("originals store", f"originals folder {root}")

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """A folder that fails to read or write (a shared volume gone, a full disk) is the
        store being down: DependencyUnavailable."""
        try:
            yield
        except OSError as exc:
            raise self.dependency.failed(exc) from None
        self.dependency.answered()

    def _path(self, key: str) -> Path:
        # Keys name files: anything but a sha256 could climb out of the root.
        if not _KEY.fullmatch(key):
            raise KeyError(key)
        return self._root / key[:2] / key[2:4] / key

    def put(self, data: bytes) -> str:
        with self._reaching():
            return self._put(data)

    def _put(self, data: bytes) -> str:
        key = content_key(data)
        path = self._path(key)
        if path.exists():
            return key
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return key

    def get(self, key: str) -> bytes:
        with self._reaching():
            try:
                return self._path(key).read_bytes()
            except FileNotFoundError:
                raise KeyError(key) from None  # a missing key, not a missing store

    def delete(self, key: str) -> None:
        with self._reaching():
            self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        with self._reaching():
            return self._path(key).is_file()

    def check(self) -> None:
        with self._reaching():
            fd, probe = tempfile.mkstemp(dir=self._root, prefix=".ready-")
            os.close(fd)
            os.unlink(probe)

    def sweep(
        self,
        referenced: Callable[[Collection[str]], set[str]],
        min_age_seconds: float,
    ) -> int:
        """Remove the files no document references (``referenced`` names those of the given
        keys that some document uses) and temporary files a crash left, older than
        ``min_age_seconds``: an upload is stored before its document row is committed, so a
        young unreferenced file may be about to be referenced. How many files went."""
        cutoff = time.time() - min_age_seconds
        removed = 0
        batch: list[Path] = []
        for path in self._old_files(cutoff):
            if path.name.startswith(".tmp-"):
                path.unlink(missing_ok=True)
                removed += 1
                continue
            batch.append(path)
            if len(batch) == _SWEEP_BATCH:
                removed += self._remove_unreferenced(batch, referenced)
                batch = []
        return removed + self._remove_unreferenced(batch, referenced)

    def _old_files(self, cutoff: float) -> Iterable[Path]:
        for path in self._root.glob("*/*/*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    yield path
            except FileNotFoundError:
                continue  # removed meanwhile, by a deletion

    @staticmethod
    def _remove_unreferenced(
        paths: list[Path], referenced: Callable[[Collection[str]], set[str]]
    ) -> int:
        keys = {path.name: path for path in paths if _KEY.fullmatch(path.name)}
        in_use = referenced(list(keys))
        for key in keys.keys() - in_use:
            keys[key].unlink(missing_ok=True)
        return len(keys.keys() - in_use)


class RegistryOriginalStore:
    """Originals as rows of the registry's database (table ``originals``), so every process
    that reaches the registry reads them. Ingestion writes them with the document row (see
    ``Documents.register_ingest``); ``put`` is for bytes stored on their own."""

    written_with_documents = True

    def __init__(self, database: Database) -> None:
        self._db = database

    def put(self, data: bytes) -> str:
        key = content_key(data)
        with self._db.write() as session:
            store_contents(session, {key: data})
        return key

    def get(self, key: str) -> bytes:
        with self._db.read() as session:
            data = session.scalar(select(OriginalRow.data).where(OriginalRow.key == key))
        if data is None:
            raise KeyError(key)
        return bytes(data)

    def delete(self, key: str) -> None:
        with self._db.write() as session:
            session.execute(delete(OriginalRow).where(OriginalRow.key == key))

    def exists(self, key: str) -> bool:
        with self._db.read() as session:
            return session.scalar(select(OriginalRow.key).where(OriginalRow.key == key)) is not None

    def check(self) -> None:
        # The registry's sessions turn a database that does not answer into
        # DependencyUnavailable.
        with self._db.read() as session:
            session.execute(select(1))


def store_contents(session: Session, contents: dict[str, bytes]) -> None:
    """Insert the contents the table lacks, in the caller's transaction. The rows already there
    are locked (PostgreSQL) until it commits, so that a deletion freeing them waits and then
    sees the new reference instead of removing bytes about to be used."""
    if not contents:
        return
    held = set(
        session.scalars(
            select(OriginalRow.key).where(OriginalRow.key.in_(list(contents))).with_for_update()
        )
    )
    session.add_all(
        OriginalRow(key=key, data=data) for key, data in contents.items() if key not in held
    )


def drop_unreferenced_contents(session: Session, keys: Collection[str]) -> None:
    """Remove those of ``keys`` no document references, in the caller's transaction (the one
    that deleted their last document's row). Locked first: see ``store_contents``."""
    if not keys:
        return
    held = list(
        session.scalars(
            select(OriginalRow.key).where(OriginalRow.key.in_(list(keys))).with_for_update()
        )
    )
    in_use = referenced_keys(session, held)
    unused = [key for key in held if key not in in_use]
    if unused:
        session.execute(delete(OriginalRow).where(OriginalRow.key.in_(unused)))


def referenced_keys(
    session: Session, keys: Collection[str], excluding: str | None = None
) -> set[str]:
    """Which of ``keys`` some document (of any tenant, in any state), or a replacement being
    indexed, references; other than the document ``excluding`` names."""
    used: set[str] = set()
    for table, columns in (
        (DocumentRow, (DocumentRow.original_key, DocumentRow.extracted_key)),
        (ReplacementRow, (ReplacementRow.original_key, ReplacementRow.extracted_key)),
    ):
        owner = DocumentRow.id if table is DocumentRow else ReplacementRow.document_id
        for column in columns:
            query = select(column).where(column.in_(list(keys)))
            if excluding is not None:
                query = query.where(owner != excluding)
            used.update(session.scalars(query))
    return used


def open_originals(settings: Settings, database: Database) -> OriginalStore:
    """The originals store RAGAPI_ORIGINALS_URL names (``database``: the registry's)."""
    url = settings.originals_url
    if url is None:
        return LocalOriginalStore(settings.data_dir / "originals")
    if url == REGISTRY_URL:
        return RegistryOriginalStore(database)
    if url.startswith("file://"):
        folder = Path(url.removeprefix("file://"))
        if folder.is_absolute():
            return LocalOriginalStore(folder)
    raise ConfigurationError(
        f"RAGAPI_ORIGINALS_URL {url!r} is not a store ragapi knows: use file:///absolute/folder "
        f"or {REGISTRY_URL}"
    )
