"""The move of a tenant's vectors to the embedding model the settings name.

The current chunks of every ready document (the registry holds their text) are embedded again
by the configured model into that model's collection, beside the old one, which keeps answering
searches (with questions embedded by the old model) until the switch: one registry write that
makes the new space current. Only then is the old collection dropped. Writers meanwhile embed
with the configured model into the new collection already (store.py), so the move only copies
what was there before it began.

A move is recorded in the registry when it begins and forgotten after its last step, so a
crash leaves it to resume: chunks the new collection holds already are not embedded again
(looked up by id), until the switch the old space answers, and after it the old collection is
dropped. A document deleted or replaced while it is being copied loses what was
copied of it (checked after the copy, as ingestion checks after its writes).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from impl.rag.embeddings import EmbeddingModel
from impl.rag.jobs import EMBED_BATCH
from impl.rag.spaces import DocumentChunks, Move, Space
from impl.rag.stores import SpaceRegistry, VectorIndex

logger = logging.getLogger(__name__)

_DOCUMENTS_PER_READ = 50
# How often a move records its progress (a registry write), besides after each read.
_PROGRESS_SECONDS = 1.0


def _no_progress(move: Move) -> None:
    del move


class SpaceMover:
    """Runs moves to this process's embedding model, one thread per tenant at most."""

    def __init__(
        self, spaces: SpaceRegistry, vectors: VectorIndex, embeddings: EmbeddingModel
    ) -> None:
        self._spaces = spaces
        self._vectors = vectors
        self._embeddings = embeddings
        self._model = Space(embeddings.model_id, embeddings.dimension)
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()

    def resume(self) -> None:
        """Start again the moves to this model that a stop or a crash interrupted."""
        for move in self._spaces.moves():
            if move.target.same_model(self._model):
                self.start(move)

    def start(self, move: Move) -> None:
        """Run ``move`` in a thread, unless this process runs it already."""
        with self._lock:
            if move.tenant in self._running or self._stopping.is_set():
                return
            thread = threading.Thread(
                target=self._run, args=(move,), name="ragapi-space-move", daemon=True
            )
            self._running[move.tenant] = thread
        thread.start()

    def stop(self, timeout: float) -> None:
        """Stop the moves at their next document; the registry keeps them for the next start."""
        self._stopping.set()
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(timeout)

    def run_here(self, move: Move, progress: Callable[[Move], None]) -> bool:
        """Run ``move`` in this thread (or wait for the thread already running it); whether the
        tenant is in the target space at the end."""
        with self._lock:
            running = self._running.get(move.tenant)
            if running is None:
                self._running[move.tenant] = threading.current_thread()
        if running is not None:
            running.join()
            return self._spaces.current_space(move.tenant).same_model(move.target)
        try:
            return self.move(move, progress)
        finally:
            with self._lock:
                self._running.pop(move.tenant, None)

    def _run(self, move: Move) -> None:
        try:
            self.move(move)
        except Exception:
            # Recorded in the registry still: the next start or re-index request resumes it.
            logger.exception("the move of a tenant to %s stopped", move.target.describe())
        finally:
            with self._lock:
                self._running.pop(move.tenant, None)

    def move(self, move: Move, progress: Callable[[Move], None] = _no_progress) -> bool:
        """Copy the tenant's chunks into ``move.target`` (this process's model), switch, then
        drop the old collection. False when stopped before the switch."""
        if not move.target.same_model(self._model):
            raise ValueError(f"this process embeds with {self._model.describe()}")
        tenant = move.tenant
        if not self._spaces.current_space(tenant).same_model(move.target):
            if not self._fill(move, progress):
                return False
            self._spaces.switch_space(tenant, move.target)
        # Also where a crash came between the switch and here.
        self._vectors.drop_other_spaces(tenant, move.target)
        self._spaces.finish_move(tenant)
        logger.info("tenant index moved to %s", move.target.describe())
        return True

    def _fill(self, move: Move, progress: Callable[[Move], None]) -> bool:
        """Copy the tenant's current chunks into the target space; False when stopped."""
        tenant = move.tenant
        total = self._spaces.ready_chunk_count(tenant)
        done = 0
        after: str | None = None
        told = time.monotonic()
        while page := self._spaces.ready_chunks(tenant, after, _DOCUMENTS_PER_READ):
            for document in page:
                if self._stopping.is_set():
                    return False
                self._copy(tenant, document)
                done += len(document.chunks)
                if time.monotonic() - told >= _PROGRESS_SECONDS or document is page[-1]:
                    # Documents ingested meanwhile may make the total grow.
                    move = dataclasses.replace(
                        move, chunks_done=done, chunks_total=max(total, done)
                    )
                    self._spaces.record_move_progress(move)
                    progress(move)
                    told = time.monotonic()
            after = page[-1].document_id
        return True

    def _copy(self, tenant: str, document: DocumentChunks) -> None:
        ids = [chunk.id for chunk in document.chunks]
        if not ids or self._vectors.count(tenant, ids) == len(ids):
            return  # an earlier run of the move, or the ingestion that wrote it, copied it
        for start in range(0, len(ids), EMBED_BATCH):
            part = document.chunks[start : start + EMBED_BATCH]
            vectors = self._embeddings.embed_documents([chunk.text for chunk in part])
            self._vectors.add(tenant, part, vectors, {document.document_id: document.metadata})
        if self._spaces.ready_version(tenant, document.document_id) != document.version:
            # Deleted or replaced meanwhile, perhaps after its vectors were removed: ours go.
            self._vectors.delete_chunks(tenant, ids)
