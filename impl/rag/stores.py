"""What the RAG service needs from its stores, as small typed interfaces, and the one factory
that builds them from the settings' URLs.

The service and the ingestion workers are written against these Protocols only, so another
implementation (another database, vector index or object store) takes a store's place without
touching them. Today one SQL registry (impl/rag/registry.py, SQLite or PostgreSQL by
``registry_url``) is the document registry, the job queue and the lexical index; Chroma
(embedded, or the server of ``chroma_url``) is the vector index; a folder holds the originals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from impl.rag.documents import NewDocument, RetiredVersion, StoredObjects
from impl.rag.events import Event, JobEvents
from impl.rag.idempotency import RecordedResponse
from impl.rag.job_queue import ClaimedJob, DocumentWork, Interrupted
from impl.rag.lexical import LexicalHit
from impl.rag.originals import OriginalStore, open_originals
from impl.rag.registry import Registry
from impl.rag.spaces import DocumentChunks, Move, Space
from impl.rag.store import DenseHit, VectorStore
from impl.rag.types import (
    Chunk,
    Document,
    DocumentStatus,
    Job,
    JobError,
    JobStatus,
    Metadata,
    Page,
    SearchFilters,
    StoreCounts,
    TermStatistics,
)
from impl.settings import Settings


class DocumentRegistry(Protocol):
    """Documents and their chunk rows, per tenant: registered with their job, read, listed and
    removed. Every method is one unit of work, safe to call from many threads."""

    def find_live(self, tenant: str, sha256s: Sequence[str]) -> dict[str, str]:
        """{sha256: document id} of the tenant's documents (not being deleted) with these."""
        ...

    def register_ingest(
        self,
        tenant: str,
        items: Sequence[NewDocument],
        contents: Mapping[str, bytes] | None = None,
    ) -> Job:
        """New documents and their job in one transaction; content already held becomes a
        duplicate of the existing document. ``contents``: the originals' bytes by key, when
        the registry holds them."""
        ...

    def get_document(self, tenant: str, document_id: str) -> Document | None: ...

    def list_documents(
        self,
        tenant: str,
        *,
        limit: int,
        cursor: str | None,
        status: DocumentStatus | None = None,
        title_contains: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> Page[Document]: ...

    def list_chunks(
        self, tenant: str, document_id: str, *, limit: int, cursor: str | None
    ) -> Page[Chunk] | None: ...

    def get_chunks(self, tenant: str, chunk_ids: Sequence[str]) -> dict[str, Chunk]: ...

    def ready_metadata(
        self, tenant: str, document_ids: Collection[str] | None
    ) -> dict[str, Metadata]: ...

    def mark_deleting(
        self, tenant: str, document_id: str, if_match: Sequence[str] | None = None
    ) -> StoredObjects | None:
        """Begin a deletion (the document disappears from every read); None when the tenant
        has no such document."""
        ...

    def being_deleted(self) -> list[StoredObjects]: ...

    def delete_document_row(self, target: StoredObjects) -> None: ...

    def counts(self) -> StoreCounts: ...

    def ping(self) -> None:
        """Raise DependencyUnavailable unless the registry answers."""
        ...

    def abandoned_replacements(self) -> list[tuple[str, str, int]]:
        """(tenant, document id, version) of the replacements whose job will not run them (it
        was cancelled or failed before the replacement was dropped, then the process died)."""
        ...

    def being_replaced(self, document_id: str) -> bool: ...

    def claim_idempotency_key(
        self, tenant: str, key: str, fingerprint: str, *, ttl: timedelta, in_flight: timedelta
    ) -> RecordedResponse | None:
        """None: the key is the caller's now, to answer and then ``record_response`` (or
        ``release_idempotency_key`` on failure). Else the first request's response. Conflict
        while the first request is still being answered, IdempotencyKeyReused for another
        body. A key is forgotten ``ttl`` after its first use, and a first request still
        unanswered after ``in_flight`` counts as never answered (its process died)."""
        ...

    def drop_replacement(self, document_id: str, version: int) -> tuple[str, ...]:
        """Forget a replacement that will not be swapped in (failed or cancelled) with its
        chunk rows (the caller has removed its vectors); the storage keys it held."""
        ...

    def forget_retired(self, document_id: str, version: int) -> None: ...

    def ready_versions(
        self, tenant: str, document_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        """Title and current version of those of the given documents that are the tenant's and
        ready."""
        ...

    def record_response(self, tenant: str, key: str, status_code: int, body: str) -> None: ...

    def register_replacement(
        self,
        tenant: str,
        document_id: str,
        item: NewDocument | None,
        *,
        title: str | None,
        metadata: Metadata | None,
        if_match: Sequence[str] | None,
        contents: Mapping[str, bytes] | None = None,
    ) -> Job:
        """The next version of a ready document and the job that indexes it, in one
        transaction; the same content as now makes a job that has already succeeded, listing
        the document as a duplicate. ``item`` None: a re-index, the stored content cut and
        embedded again under the current settings. ``title`` and ``metadata``: None keeps the
        document's."""
        ...

    def register_tenant_reindex(self, tenant: str) -> Job:
        """One job re-indexing every ready document of the tenant not being replaced, each as
        its next version from its stored content; already succeeded when there is none."""
        ...

    def release_idempotency_key(self, tenant: str, key: str) -> None:
        """The first request failed: a retry is a first request again."""
        ...

    def retired_versions(self) -> list[RetiredVersion]: ...

    def update_document(
        self,
        tenant: str,
        document_id: str,
        *,
        title: str,
        metadata: Metadata,
        if_match: Sequence[str] | None,
    ) -> Document:
        """Set the title and metadata of a ready or failed document that no replacement is
        indexing (Conflict otherwise)."""
        ...


class JobQueue(Protocol):
    """Ingestion jobs, claimed by workers under leases, with the writes a running job makes
    (chunk rows, its documents' outcome) checked against the lease."""

    def get_job(self, tenant: str, job_id: str) -> Job | None: ...

    def job_events(self, tenant: str, job_id: str, *, after: int, limit: int) -> JobEvents | None:
        """The job's events after the id ``after``, oldest first; None when the tenant has
        no such job."""
        ...

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
        """The tenant's events after ``after`` (up to ``up_to``): those of ``job_ids``, and
        with ``documents`` every document event."""
        ...

    def last_event_id(self) -> int: ...

    def queued_job_ids(self, limit: int) -> list[str]: ...

    def claim_job(self, job_id: str | None, owner: str, lease: timedelta) -> ClaimedJob | None:
        """The given queued job, or the oldest when None, now running under ``owner``'s
        lease; None when there is nothing to claim."""
        ...

    def job_work(self, job_id: str) -> list[DocumentWork]: ...

    def renew_lease(self, job_id: str, owner: str, lease: timedelta) -> None: ...

    def start_progress(
        self, job_id: str, owner: str, lease: timedelta, total: int, work: Sequence[DocumentWork]
    ) -> None: ...

    def add_chunks(
        self,
        job_id: str,
        owner: str,
        lease: timedelta,
        written: Sequence[tuple[DocumentWork, Sequence[Chunk]]],
    ) -> list[bool]:
        """Store the documents' chunk rows (and their lexical postings) in one transaction;
        for each document, False when its deletion began."""
        ...

    def skip_chunks(self, job_id: str, owner: str, lease: timedelta, count: int) -> None: ...

    def mark_ready(self, document_id: str, chunk_count: int) -> bool: ...

    def mark_failed(self, document_id: str, reason: str) -> bool: ...

    def finish_job(
        self, job_id: str, owner: str, error: JobError | None, *, cancelled: bool = False
    ) -> None: ...

    def release_job(self, job_id: str, owner: str) -> bool:
        """False when ``owner`` no longer held the job."""
        ...

    def find_interrupted(self, *, every_running: bool, max_attempts: int) -> list[Interrupted]: ...

    def requeue(self, job_id: str, owner: str | None) -> bool:
        """False when ``owner`` no longer held the job."""
        ...

    def count_queued(self) -> int: ...

    def give_up(self, job_id: str, document_ids: Sequence[str], error: JobError) -> None: ...

    def cancel_job(
        self, tenant: str, job_id: str
    ) -> tuple[Job, list[str], list[tuple[str, int]]] | None:
        """A queued job ends cancelled at once, its new documents failed (their chunk rows
        dropped); a running one is asked to stop (its worker finishes the cancellation). The
        job, the documents failed here and the replacements the caller is to drop (vectors,
        then rows); None when there is no such job."""
        ...

    def cancel_requested(self, job_id: str) -> bool: ...

    def drop_replacement(self, document_id: str, version: int) -> tuple[str, ...]:
        """Forget a replacement that will not be swapped in (failed or cancelled) with its
        chunk rows (the caller has removed its vectors); the storage keys it held."""
        ...

    def list_jobs(
        self, tenant: str, *, limit: int, cursor: str | None, status: JobStatus | None
    ) -> Page[Job]:
        """Newest first by (created_at, id); the cursor names the last item of a page."""
        ...

    def swap_version(self, document_id: str, version: int) -> RetiredVersion | None:
        """Make the indexed replacement the document's version, in one transaction: from its
        commit every read sees the new version and none the old. The old version's chunk rows
        go in the same transaction; its vectors and bytes are left to remove, as returned. None
        when the replacement is gone (the document was deleted, or the job cancelled)."""
        ...


class LexicalIndex(Protocol):
    def lexical_search(
        self,
        tenant: str,
        query: str,
        *,
        limit: int,
        document_ids: Collection[str] | None,
        exclude_documents: Collection[str],
        only_versions: Mapping[str, int],
    ) -> list[LexicalHit]:
        """The tenant's best chunks for ``query`` by BM25, best first."""
        ...

    def term_statistics(self, tenant: str, terms: Collection[str]) -> TermStatistics:
        """The tenant's chunk count and the document frequency of each of ``terms``."""
        ...


class VectorIndex(Protocol):
    """Chunk vectors per tenant. Writing the same chunk ids again replaces them."""

    def add(
        self,
        tenant: str,
        chunks: Sequence[Chunk],
        vectors: Sequence[Sequence[float]],
        metadata: Mapping[str, Metadata],
    ) -> None:
        """Each chunk's vector with its document's user ``metadata`` (by document id)."""
        ...

    def count(self, tenant: str, chunk_ids: Sequence[str]) -> int: ...

    def delete_documents(self, tenant: str, document_ids: Sequence[str]) -> None: ...

    def nearest(
        self,
        tenant: str,
        vector: Sequence[float],
        top_k: int,
        filters: SearchFilters | None,
        exclude_documents: Collection[str] = frozenset(),
        only_versions: Mapping[str, int] | None = None,
        *,
        space: Space | None = None,
    ) -> list[DenseHit]:
        """The nearest chunks that pass ``filters``, closest first, as ids, versions and
        scores (their texts are the registry's); ``vector`` is the question embedded by
        ``space``'s model, searched in that space's vectors."""
        ...

    def spaces(self, tenant: str) -> tuple[Space, Space]:
        """The tenant's current space (its searches') and the one writes go into."""
        ...

    def search_space(self, tenant: str) -> Space:
        """The tenant's current space as this process last read it; read again after a
        search (``nearest``) found that space's collection gone."""
        ...

    def drop_other_spaces(self, tenant: str, keep: Space) -> None:
        """Delete the tenant's vectors of every space but ``keep``."""
        ...

    def heartbeat(self) -> None:
        """Raise DependencyUnavailable unless the index answers."""
        ...

    def delete_chunks(self, tenant: str, chunk_ids: Sequence[str]) -> None:
        """Remove these vectors, by id (no scan)."""
        ...

    def delete_version(self, tenant: str, document_id: str, version: int) -> None:
        """Remove the vectors one version of a document was given (a replacement's: they always
        carry their version)."""
        ...

    def set_metadata(self, tenant: str, document_id: str, metadata: Metadata) -> None:
        """Give every vector of the document (of every version) this user metadata, in place:
        nothing is embedded again."""
        ...


class SpaceRegistry(Protocol):
    """Which embedding model's vectors answer each tenant, and the moves between models
    (impl/rag/spaces.py)."""

    def current_space(self, tenant: str) -> Space: ...

    def switch_space(self, tenant: str, space: Space) -> None:
        """Make ``space`` current, in one transaction (a move stays recorded)."""
        ...

    def finish_move(self, tenant: str) -> None: ...

    def begin_move(self, tenant: str, target: Space) -> Move: ...

    def record_move_progress(self, move: Move) -> None: ...

    def move_of(self, tenant: str) -> Move | None: ...

    def moves(self) -> list[Move]: ...

    def tenants(self) -> list[str]:
        """Every tenant that holds a document."""
        ...

    def ready_chunks(self, tenant: str, after: str | None, limit: int) -> list[DocumentChunks]:
        """The tenant's ready documents by id after ``after``, with their current chunks."""
        ...

    def ready_chunk_count(self, tenant: str) -> int: ...

    def ready_version(self, tenant: str, document_id: str) -> int | None: ...


@dataclass(frozen=True)
class Stores:
    """The service's stores; ``close`` closes them all."""

    documents: DocumentRegistry
    jobs: JobQueue
    lexical: LexicalIndex
    vectors: VectorIndex
    originals: OriginalStore
    spaces: SpaceRegistry
    close: Callable[[], None]


def build_stores(settings: Settings, model_id: str, dimension: int) -> Stores:
    """The stores the settings name: the registry at ``registry_url`` (SQLite under data_dir
    by default), Chroma at ``chroma_url`` (embedded by default), the originals at
    ``originals_url`` (a folder under data_dir by default). ``model_id``: the model writes embed
    with; the registry records the first one used as the default space's."""
    with contextlib.ExitStack() as opened:
        # Whatever fails below closes what was already opened.
        registry = Registry(
            settings.resolved_registry_url,
            upgrade=settings.registry_upgrades_on_start,
            event_retention=timedelta(seconds=settings.event_retention_seconds),
        )
        opened.callback(registry.close)
        registry.record_default_model(model_id, dimension)
        vectors = VectorStore(settings, model_id, dimension, spaces=registry)
        opened.callback(vectors.close)
        originals = open_originals(settings, registry.database)
        closing = opened.pop_all()
    return Stores(
        documents=registry,
        jobs=registry,
        lexical=registry,
        vectors=vectors,
        originals=originals,
        spaces=registry,
        close=closing.close,
    )
