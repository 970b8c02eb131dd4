"""Embeddings computed once and kept outside the repository, keyed by model id and the sha256 of
the text, so that seeding 100k chunks costs the model's time on the first run only.

The vectors come from the very model the server runs (same class, same bytes, same model id),
so a seeded store is the store the server would have built from the same uploads.
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import threading
import time
from pathlib import Path

import numpy as np

from impl.rag.embeddings import EmbeddingModel

DEFAULT_DIR = Path.home() / ".cache" / "ragapi-bench"
_FILL_BATCH = 256  # vectors committed together: an interrupted fill loses at most this many
_FLOAT32 = np.dtype("<f4")


def _key(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


class EmbeddingCache:
    """Thread-safe: the seeding service's ingestion worker reads it from its own thread."""

    def __init__(self, folder: Path, model_id: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "embeddings.sqlite"
        self._model_id = model_id
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (model_id TEXT, text_sha256 BLOB, vector BLOB, "
            "PRIMARY KEY (model_id, text_sha256))"
        )

    def close(self) -> None:
        self._db.close()

    def get(self, texts: list[str]) -> list[list[float] | None]:
        with self._lock:
            found = []
            for text in texts:
                row = self._db.execute(
                    "SELECT vector FROM vectors WHERE model_id = ? AND text_sha256 = ?",
                    (self._model_id, _key(text)),
                ).fetchone()
                found.append(None if row is None else np.frombuffer(row[0], _FLOAT32).tolist())
            return found

    def put(self, texts: list[str], vectors: list[list[float]]) -> None:
        rows = [
            (self._model_id, _key(text), np.asarray(vector, _FLOAT32).tobytes())
            for text, vector in zip(texts, vectors, strict=True)
        ]
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?)", rows)

    def fill(self, model: EmbeddingModel, texts: list[str]) -> float:
        """Embed the texts not cached yet; seconds spent embedding."""
        missing = [t for t, v in zip(texts, self.get(texts), strict=True) if v is None]
        missing = list(dict.fromkeys(missing))
        started = time.perf_counter()
        for start in range(0, len(missing), _FILL_BATCH):
            batch = missing[start : start + _FILL_BATCH]
            self.put(batch, model.embed_documents(batch))
            done = start + len(batch)
            elapsed = time.perf_counter() - started
            left_min = (len(missing) - done) * elapsed / done / 60
            print(
                f"bench: embedded {done}/{len(missing)} chunks for the cache, "
                f"{done / elapsed:.1f}/s, {left_min:.0f} min left",
                file=sys.stderr,
                flush=True,
            )
        return time.perf_counter() - started


class CachedEmbeddings(EmbeddingModel):
    """The model, with embed_documents answered from the cache where it can be (and the cache
    filled where it cannot). Queries always run the model."""

    def __init__(self, model: EmbeddingModel, cache: EmbeddingCache) -> None:
        self.model_id = model.model_id
        self._model = model
        self._cache = cache
        self.misses = 0

    @property
    def dimension(self) -> int:
        return self._model.dimension

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        found = self._cache.get(texts)
        missing = [text for text, vector in zip(texts, found, strict=True) if vector is None]
        computed: list[list[float]] = []
        if missing:
            self.misses += len(missing)
            computed = self._model.embed_documents(missing)
            self._cache.put(missing, computed)
        fresh = iter(computed)
        return [next(fresh) if vector is None else vector for vector in found]

    def embed_query(self, text: str) -> list[float]:
        return self._model.embed_query(text)
