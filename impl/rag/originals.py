"""Storage of uploaded originals (and of their extracted text), content-addressed by sha256.

The interface is deliberately small (put, get, delete, exists) so that an object store can take
the local folder's place when ragapi grows past one machine.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from impl.dependencies import Dependency

_KEY = re.compile(r"[0-9a-f]{64}")


def content_key(data: bytes) -> str:
    """The key under which ``data`` is stored: its sha256, lowercase hex."""
    return hashlib.sha256(data).hexdigest()


class OriginalStore(Protocol):
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
