"""Fixtures for the RAG stack: a fresh data dir per test, real Chroma, and the real packaged
embedding model, loaded once per session. The helpers below are imported by the test modules."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import chromadb
import pytest
from chromadb.errors import NotFoundError

from impl.rag.embeddings import EmbeddingModel, build_embeddings
from impl.rag.originals import LocalOriginalStore
from impl.rag.registry import Registry
from impl.rag.service import RagService
from impl.rag.store import chroma_settings, collection_name
from impl.rag.types import IngestItem, Job, Metadata
from impl.settings import Settings


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test: nothing read from the environment or a .env file."""
    return Settings(_env_file=None, data_dir=data_dir, **overrides)  # type: ignore[call-arg]


@contextmanager
def folder_store(folder: Path) -> Iterator[LocalOriginalStore]:
    """An originals folder under ``folder`` with its registry (SQLite, holding no document)."""
    registry = Registry(f"sqlite:///{folder / 'registry.db'}", upgrade=True)
    try:
        yield LocalOriginalStore(folder / "originals", registry.database)
    finally:
        registry.close()


def text_item(
    text: str,
    *,
    title: str | None = None,
    filename: str | None = None,
    metadata: Metadata | None = None,
) -> IngestItem:
    return IngestItem(
        content=text.encode(), filename=filename, title=title, metadata=metadata or {}
    )


def ingest(service: RagService, tenant: str, items: list[IngestItem], timeout: float = 120) -> Job:
    """Submit and wait; the job must succeed."""
    job = service.wait_for_job(tenant, service.submit_ingest(tenant, items).id, timeout)
    assert job.status == "succeeded", job
    return job


def vector_metadata(data_dir: Path, tenant: str, document_id: str | None = None) -> dict[str, Any]:
    """Chroma's own view of the tenant's vectors (of one document): id -> metadata, read through
    a client of our own rather than through the service."""
    client = chromadb.PersistentClient(path=str(data_dir / "chroma"), settings=chroma_settings())
    try:
        try:
            collection = client.get_collection(collection_name(tenant), embedding_function=None)
        except NotFoundError:
            return {}
        where = None if document_id is None else {"document_id": document_id}
        found = collection.get(where=where, include=["metadatas"])  # type: ignore[arg-type]
        return dict(zip(found["ids"], found["metadatas"] or [], strict=True))
    finally:
        client.close()


@pytest.fixture(scope="session")
def embeddings() -> EmbeddingModel:
    return build_embeddings(make_settings(Path("unused")))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


ServiceFactory = Callable[..., RagService]


@pytest.fixture
def make_service(data_dir: Path, embeddings: EmbeddingModel) -> Iterator[ServiceFactory]:
    """Builds services on the test's data dir (settings overridable), closing them all at the
    end; ``start=False`` leaves the workers stopped, so jobs stay queued."""
    services: list[RagService] = []

    def build(*, start: bool = True, **overrides: Any) -> RagService:
        service = RagService(make_settings(data_dir, **overrides), embeddings)
        services.append(service)
        if start:
            service.start()
        return service

    yield build
    for service in services:
        service.close()


@pytest.fixture
def service(make_service: ServiceFactory) -> RagService:
    return make_service()
