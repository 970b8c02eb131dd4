"""Seeding: the server's data dir filled by ragapi's own ingestion, in-process.

The documents go through RagService.submit_ingest like an upload does (type detection,
extraction, stored originals, registry rows, the chunker, ingestion jobs and workers, Chroma
writes); the only difference is that the embedding model's answers for the chunks come from the
cache (cache.py) when they are there. The result is a normal data dir, which ``ragapi serve``
then opens. The server must not be running meanwhile: embedded Chroma serves one process.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

from impl.rag.service import RagService
from impl.rag.types import IngestItem
from impl.settings import Settings
from scripts.bench.cache import CachedEmbeddings
from scripts.bench.corpus import SEED_CHUNK_TOKENS, SEED_OVERLAP_TOKENS, SourceDocument
from scripts.bench.server import TENANT

_FILES_PER_JOB = 20  # the most one ingest request may carry (max_files_per_request)
_JOBS_IN_FLIGHT = 16  # well inside the ingestion queue (64)
_JOB_TIMEOUT_SECONDS = 3600.0


def seed_settings(data_dir: Path) -> Settings:
    """The server's defaults, with the chunker of corpus.plan()."""
    return Settings(
        data_dir=data_dir,
        chunk_tokens=SEED_CHUNK_TOKENS,
        chunk_overlap_tokens=SEED_OVERLAP_TOKENS,
    )


def seed(data_dir: Path, documents: list[SourceDocument], embeddings: CachedEmbeddings) -> float:
    """Ingest ``documents`` into ``data_dir``; the seconds it took."""
    started = time.perf_counter()
    service = RagService(seed_settings(data_dir), embeddings=embeddings)
    service.start()
    try:
        pending: collections.deque[str] = collections.deque()
        for start in range(0, len(documents), _FILES_PER_JOB):
            items = [
                IngestItem(document.content, document.filename, None, {})
                for document in documents[start : start + _FILES_PER_JOB]
            ]
            pending.append(service.submit_ingest(TENANT, items).id)
            while len(pending) >= _JOBS_IN_FLIGHT:
                _finish(service, pending.popleft())
        while pending:
            _finish(service, pending.popleft())
    finally:
        service.close()
    return time.perf_counter() - started


def _finish(service: RagService, job_id: str) -> None:
    job = service.wait_for_job(TENANT, job_id, _JOB_TIMEOUT_SECONDS)
    if job.status != "succeeded" or job.duplicate_document_ids:
        raise SystemExit(f"seeding job {job_id} ended {job.status}: {job.error}")
