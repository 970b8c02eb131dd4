"""Storage of uploaded originals (and of their extracted text), content-addressed by sha256,
where every process that ingests can read them: the API process stores an upload, any worker
on any machine chunks it.

Two stores, chosen by RAGAPI_ORIGINALS_URL: a folder (the default under the data directory, or
a volume every machine mounts), and the registry's database, whose rows are written in the
transaction that registers their document, so a crash can leave no unreferenced bytes behind.
The folder has no such transaction: a protocol of pins and tombstones keeps a deletion from
removing bytes an upload is registering (see ``LocalOriginalStore``), and ``sweep`` removes what
a crash left there. No object store (S3): no S3-compatible server runs where the tests run, so
none is offered untested.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
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
_TMP = ".tmp-"
_PIN = ".pin-"
_TOMB = ".tomb-"


def content_key(data: bytes) -> str:
    """The key under which ``data`` is stored: its sha256, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


class Upload(Protocol):
    """Where an upload puts its bytes until the documents that reference them are registered."""

    # The bytes by key that the registering transaction writes (``Documents.register_ingest``'s
    # contents): the registry store's; empty when they are stored already.
    contents: dict[str, bytes]

    def put(self, data: bytes) -> str:
        """Store ``data`` (a no-op for bytes already held) and return its key."""
        ...


class OriginalStore(Protocol):
    def upload(self) -> AbstractContextManager[Upload]:
        """Register the documents that reference what the upload stores before the block
        ends: until then no deletion removes those bytes."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; KeyError when there are none."""
        ...

    def discard(self, keys: Collection[str], excluding: str | None = None) -> None:
        """Remove those of ``keys`` that no document (other than ``excluding``, whose deletion
        this is) or replacement references, and no upload is registering."""
        ...

    def exists(self, key: str) -> bool: ...

    def check(self) -> None:
        """Raise DependencyUnavailable unless the store can be written (readiness)."""
        ...


class LocalOriginalStore:
    """A folder of files named by their sha256, fanned out as ``ab/cd/abcd…`` so that no one
    directory grows huge. Writes go to a temporary file in the target directory, are fsynced, then
    renamed into place, so a reader (or a crash) never sees half a file.

    The folder may be shared by processes on several machines that share nothing else but the
    registry, so removing bytes must not race an upload of the same bytes (which finds the file
    there and writes nothing). The protocol, with K a key's file, using only atomic steps of the
    file system (link, rename) and reads of the registry:

    - An upload pins K: a hard link ``K.pin-<time>-<token>`` to K's file, made from K (which
      fails when K is missing: then it writes the bytes, links the pin to them and moves them
      to K). It registers its documents, then removes its pins.
    - A removal renames K to a tombstone ``K.tomb-<token>``, then reads the tombstone's link
      count (more than one: pinned), then asks the registry for references. Pinned or
      referenced: the tombstone goes back to K (by a hard link, which never replaces a K
      written meanwhile); neither: it is unlinked.
    - Why no referenced bytes are lost: take an upload U and a removal R of K. If U pinned K
      before R's rename, the pin links the file R moved: R counts it, or, when U had already
      removed it, finds U's document, committed before that, in the registry; R restores. If
      U came after R's rename, U's pin could not be made from K as R left it: U linked a K
      restored or written since, or wrote K itself. No clock and no lock is involved, so this
      holds between processes and machines.
    - A reader that finds K missing reads the tombstone it is in for that moment.
    - A crash can leave a pin (the sweep removes those older than an upload can take, by the
      time in its name), a temporary file, or a tombstone (the sweep decides it as a removal
      would)."""

    def __init__(self, root: Path, database: Database) -> None:
        self._root = root
        self._db = database
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

    @contextmanager
    def upload(self) -> Iterator[Upload]:
        upload = _PinnedUpload(self)
        try:
            yield upload
        finally:
            with self._reaching():
                for pin in upload.pins.values():
                    pin.unlink(missing_ok=True)

    def _pin(self, key: str, data: bytes, pin_name: str) -> Path:
        """Store ``data`` under ``key``, pinned (see the class); the pin."""
        path = self._path(key)
        pin = path.with_name(f"{key}{pin_name}")
        with self._reaching():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, pin)
            except FileNotFoundError:
                self._write(path, data, pin)
        return pin

    @staticmethod
    def _write(path: Path, data: bytes, pin: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, pin)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with self._reaching():
            # K, else the tombstone it is in while a removal decides, else K once restored.
            for candidate in (path, *self._tombstones(path), path):
                try:
                    return candidate.read_bytes()
                except FileNotFoundError:
                    continue
        raise KeyError(key)  # a missing key, not a missing store

    def discard(self, keys: Collection[str], excluding: str | None = None) -> None:
        with self._reaching():
            self._discard(list(dict.fromkeys(keys)), excluding)

    def _discard(self, keys: list[str], excluding: str | None) -> int:
        """How many files went."""
        paths = {key: self._path(key) for key in keys}
        # A first look spares moving the files still in use out of readers' way.
        kept = self._referenced(paths, excluding) | self._pinned(paths)
        tombs: dict[str, Path] = {}
        unused: set[str] = set()
        try:
            for key, path in paths.items():
                if key in kept:
                    continue
                tomb = path.with_name(f"{key}{_TOMB}{uuid.uuid4().hex}")
                try:
                    path.rename(tomb)
                except FileNotFoundError:
                    continue  # gone already, or another removal has it
                tombs[key] = tomb
            # Pins first, then the registry: an upload removes its pin after it registers.
            unused = tombs.keys() - self._pinned(tombs)
            unused -= self._referenced(unused, excluding)
        finally:
            # On an error (the registry did not answer) nothing is unused: all goes back.
            for key, tomb in tombs.items():
                if key in unused:
                    tomb.unlink(missing_ok=True)
                else:
                    _restore(tomb, paths[key])
        return len(unused)

    def _settle(self, tomb: Path, key: str) -> int:
        """Decide the tombstone of a removal that did not finish, as it would have (any process
        may: see the class). How many files went."""
        path = self._path(key)
        if path.exists() or self._pinned({key: tomb}) or self._referenced([key], None):
            _restore(tomb, path)
            return 0
        tomb.unlink(missing_ok=True)
        return 1

    def _referenced(self, keys: Collection[str], excluding: str | None) -> set[str]:
        if not keys:
            return set()
        with self._db.read() as session:
            return referenced_keys(session, list(keys), excluding)

    @staticmethod
    def _pinned(paths: Mapping[str, Path]) -> set[str]:
        """Those of the keys whose file (at the path given) has another link: a pin."""
        pinned = set()
        for key, path in paths.items():
            try:
                if path.stat().st_nlink > 1:
                    pinned.add(key)
            except FileNotFoundError:
                continue
        return pinned

    @staticmethod
    def _tombstones(path: Path) -> list[Path]:
        return sorted(path.parent.glob(f"{path.name}{_TOMB}*"))

    def exists(self, key: str) -> bool:
        with self._reaching():
            path = self._path(key)
            return path.is_file() or bool(self._tombstones(path))

    def check(self) -> None:
        with self._reaching():
            fd, probe = tempfile.mkstemp(dir=self._root, prefix=".ready-")
            os.close(fd)
            os.unlink(probe)

    def sweep(self, min_age_seconds: float) -> int:
        """Remove what a crash left: files no document references, temporary files and pins
        older than ``min_age_seconds`` (an upload is expected to register its documents
        sooner), and tombstones of a removal that did not finish (restored or removed as it
        would have). How many files went."""
        cutoff = time.time() - min_age_seconds
        removed = 0
        batch: list[str] = []
        with self._reaching():
            for path in self._root.glob("*/*/*"):
                name = path.name
                key = name.partition(".")[0]
                if not _KEY.fullmatch(key) and not name.startswith(_TMP):
                    continue  # nothing ragapi writes
                if _TOMB in name:
                    removed += self._settle(path, key)
                elif _PIN in name:
                    if _pinned_before(name, cutoff):
                        path.unlink(missing_ok=True)
                elif _modified_before(path, cutoff):
                    if name == key:
                        batch.append(key)
                    else:  # a temporary file
                        path.unlink(missing_ok=True)
                        removed += 1
                if len(batch) == _SWEEP_BATCH:
                    removed += self._discard(batch, None)
                    batch = []
            return removed + self._discard(batch, None)


class _PinnedUpload:
    """An upload to the folder: every key it puts stays pinned until the upload ends."""

    def __init__(self, store: LocalOriginalStore) -> None:
        self._store = store
        self._pin_name = f"{_PIN}{int(time.time())}-{uuid.uuid4().hex}"
        self.pins: dict[str, Path] = {}
        self.contents: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        key = content_key(data)
        if key not in self.pins:
            self.pins[key] = self._store._pin(key, data, self._pin_name)
        return key


def _restore(tomb: Path, path: Path) -> None:
    """Put a tombstone back at ``path``, unless an upload wrote the same bytes there meanwhile."""
    try:
        os.link(tomb, path)
    except FileExistsError:
        pass
    except FileNotFoundError:
        return  # another process decided this tombstone already
    tomb.unlink(missing_ok=True)


def _pinned_before(name: str, cutoff: float) -> bool:
    made = name.partition(_PIN)[2].partition("-")[0]
    return not made.isdigit() or int(made) < cutoff


def _modified_before(path: Path, cutoff: float) -> bool:
    try:
        return path.is_file() and path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False  # removed meanwhile


class RegistryOriginalStore:
    """Originals as rows of the registry's database (table ``originals``), so every process
    that reaches the registry reads them. An upload's bytes are written in the transaction
    that registers their document (``Documents.register_ingest``'s contents)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    @contextmanager
    def upload(self) -> Iterator[Upload]:
        yield _RegisteredUpload()

    def get(self, key: str) -> bytes:
        with self._db.read() as session:
            data = session.scalar(select(OriginalRow.data).where(OriginalRow.key == key))
        if data is None:
            raise KeyError(key)
        return bytes(data)

    def discard(self, keys: Collection[str], excluding: str | None = None) -> None:
        with self._db.write() as session:
            drop_unreferenced_contents(session, keys, excluding)

    def exists(self, key: str) -> bool:
        with self._db.read() as session:
            return session.scalar(select(OriginalRow.key).where(OriginalRow.key == key)) is not None

    def check(self) -> None:
        # The registry's sessions turn a database that does not answer into
        # DependencyUnavailable.
        with self._db.read() as session:
            session.execute(select(1))


class _RegisteredUpload:
    def __init__(self) -> None:
        self.contents: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        key = content_key(data)
        self.contents[key] = data
        return key


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


def drop_unreferenced_contents(
    session: Session, keys: Collection[str], excluding: str | None
) -> None:
    """Remove those of ``keys`` no document other than ``excluding`` references, in the
    caller's transaction. Locked first: see ``store_contents``."""
    if not keys:
        return
    held = list(
        session.scalars(
            select(OriginalRow.key).where(OriginalRow.key.in_(list(keys))).with_for_update()
        )
    )
    in_use = referenced_keys(session, held, excluding)
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
        return LocalOriginalStore(settings.data_dir / "originals", database)
    if url == REGISTRY_URL:
        return RegistryOriginalStore(database)
    if url.startswith("file://"):
        folder = Path(url.removeprefix("file://"))
        if folder.is_absolute():
            return LocalOriginalStore(folder, database)
    raise ConfigurationError(
        f"RAGAPI_ORIGINALS_URL {url!r} is not a store ragapi knows: use file:///absolute/folder "
        f"or {REGISTRY_URL}"
    )
