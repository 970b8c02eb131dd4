"""The values the RAG services take and give. Field names match the JSON fields of the
contract, so the web layer turns each into its generated model with ``from_attributes``."""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Literal, Protocol, TypeVar

T = TypeVar("T")

MetadataValue = str | int | float | bool
Metadata = dict[str, MetadataValue]
DocumentStatus = Literal["pending", "ready", "failed"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED_JOB_STATUSES: tuple[JobStatus, ...] = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class IngestItem:
    """One document handed in: the raw bytes of an upload, or text given as JSON."""

    content: bytes
    filename: str | None
    title: str | None
    metadata: Metadata
    declared_media_type: str | None = None  # the client's claim; content decides


@dataclass(frozen=True)
class DocumentPatch:
    """A JSON Merge Patch of a document: a new title (None: unchanged); metadata keys to set,
    a key given None removed; ``clear_metadata`` removes every key first."""

    title: str | None = None
    metadata: dict[str, MetadataValue | None] = field(default_factory=dict)
    clear_metadata: bool = False


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    filename: str | None
    media_type: str
    size_bytes: int
    sha256: str
    chunk_count: int
    status: DocumentStatus
    created_at: datetime
    updated_at: datetime
    metadata: Metadata
    error: str | None = None
    version: int = 1  # one more with each replacement of the content


@dataclass(frozen=True)
class Chunk:
    id: str
    document_id: str
    index: int
    text: str
    page: int | None  # 1-based page for paged formats (PDF), else None
    start_char: int  # offsets into the document's extracted text
    end_char: int
    version: int = 1  # the version of the document the chunk belongs to


@dataclass(frozen=True)
class JobError:
    title: str
    detail: str


@dataclass(frozen=True)
class Job:
    id: str
    status: JobStatus
    created_at: datetime
    updated_at: datetime
    chunks_done: int
    chunks_total: int
    document_ids: list[str]
    duplicate_document_ids: list[str]  # subset of document_ids that already existed
    error: JobError | None = None
    cancel_requested: bool = False


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True)
class MetadataRange:
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


@dataclass(frozen=True)
class SearchFilters:
    """document_ids: only these documents. metadata: every condition must hold; a condition
    is a value (equality), a list (one of), or a MetadataRange."""

    document_ids: list[str] | None = None
    metadata: dict[str, MetadataValue | list[MetadataValue] | MetadataRange] = field(
        default_factory=dict
    )


RetrievalMode = Literal["dense", "lexical", "hybrid"]
Signal = Literal["dense", "lexical"]


@dataclass(frozen=True)
class RetrievalOptions:
    """How candidates are found and ordered. dense: cosine similarity of embeddings; lexical:
    BM25 over the chunks' words; hybrid: both, fused by weighted reciprocal rank (each list
    contributes weight / (rrf_k + rank)). candidates: how many each index contributes before
    fusion. (No reranking: no cross-encoder ships inside a PyPI wheel to run offline.)"""

    mode: RetrievalMode = "hybrid"
    dense_weight: float = 1.0
    lexical_weight: float = 1.0
    rrf_k: int = 60
    candidates: int = 50


@dataclass(frozen=True)
class SignalScore:
    """One signal's view of a hit: its own score and its 1-based rank among that signal's
    candidates."""

    score: float
    rank: int


@dataclass(frozen=True)
class TermStatistics:
    """How rare some terms are in a tenant's whole collection: the chunks it holds, and how many
    of them hold each term (a term it holds nowhere is left out)."""

    chunks: int
    frequencies: dict[str, int]


TermStatisticsLookup = Callable[[Collection[str]], TermStatistics]
"""The collection statistics of the given terms (as impl.rag.terms analyses text)."""


@dataclass(frozen=True)
class SearchHit:
    chunk: Chunk
    document_title: str
    # The ordering score of the mode: cosine in [-1, 1] for dense, BM25 for lexical, the fused
    # reciprocal-rank score for hybrid; higher is better.
    score: float
    # Each signal that found the hit, with its score and rank (the "explain" of the contract).
    explain: dict[Signal, SignalScore] = field(default_factory=dict)


@dataclass(frozen=True)
class Citation:
    marker: int  # the n of [n] in the answer text
    document_id: str
    document_title: str
    chunk_id: str
    quote: str
    page: int | None
    start_char: int
    end_char: int


@dataclass(frozen=True)
class Timings:
    retrieval_ms: float
    generation_ms: float
    total_ms: float


@dataclass(frozen=True)
class Answer:
    answer: str
    citations: list[Citation]
    provider: str
    found: bool  # False when no passage answers the question (the answer cites nothing)
    timings: Timings


@dataclass(frozen=True)
class Exchange:
    """One earlier turn of a conversation: the question as it was asked, and the answer."""

    question: str
    answer: str


# The events of a streamed answer, in order: one RetrievalEvent, TokenEvents, one DoneEvent.


@dataclass(frozen=True)
class RetrievalEvent:
    """The hits the answer draws on; sent before any token."""

    hits: list[SearchHit]


@dataclass(frozen=True)
class TokenEvent:
    """A delta of the answer text: the deltas of a stream, concatenated, are its
    ``Answer.answer`` exactly."""

    text: str


@dataclass(frozen=True)
class DoneEvent:
    """The full answer, with its checked citations and timings; always the last event."""

    answer: Answer


AnswerEvent = RetrievalEvent | TokenEvent | DoneEvent


@dataclass(frozen=True)
class StoreCounts:
    documents: dict[str, int]  # by status
    jobs: dict[str, int]  # by status
    chunks: int  # of ready documents


JobEvent = Literal["claimed", "succeeded", "failed", "released", "reclaimed", "given_up"]


class StageObserver(Protocol):
    """Told how long each stage of the RAG stack took, how many chunks were embedded and what
    became of the ingestion jobs a process handled; the observability layer turns it into
    metrics (impl/rag knows nothing of Prometheus)."""

    def observe(
        self, stage: Literal["embedding", "retrieval", "generation"], seconds: float
    ) -> None: ...

    def chunks_embedded(self, count: int) -> None: ...

    def ingest_job(self, event: JobEvent) -> None: ...


class _NoObserver:
    def observe(
        self, stage: Literal["embedding", "retrieval", "generation"], seconds: float
    ) -> None:
        pass

    def chunks_embedded(self, count: int) -> None:
        pass

    def ingest_job(self, event: JobEvent) -> None:
        pass


NO_OBSERVER: StageObserver = _NoObserver()
