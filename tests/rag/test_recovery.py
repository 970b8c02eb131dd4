"""Crash consistency: a process killed mid-embedding, a job interrupted too often, a deletion
cut short and a shutdown mid-job all end, after the next start, with every document either
ready with exactly its vectors or failed with none, and no vector without a document."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from impl.rag.embeddings import EmbeddingModel
from impl.rag.registry import Registry
from impl.rag.store import VectorStore
from impl.rag.types import Chunk
from tests.conftest import ROOT
from tests.rag.conftest import ServiceFactory, ingest, make_settings, text_item, vector_metadata

TENANT = "acme"
# Small chunks make many cheap embedding batches: a kill lands mid-way reliably and quickly.
SMALL_CHUNKS = {"chunk_tokens": 32, "chunk_overlap_tokens": 0}

CHILD = """
import sys, time
from pathlib import Path
from impl.rag.service import RagService
from impl.rag.types import IngestItem
from impl.settings import Settings

settings = Settings(
    _env_file=None, data_dir=Path(sys.argv[1]), chunk_tokens=32, chunk_overlap_tokens=0
)
service = RagService(settings)
service.start()
content = Path(sys.argv[2]).read_bytes()
job = service.submit_ingest("acme", [IngestItem(content, "big.txt", None, {"shelf": 3})])
print(job.id, flush=True)
time.sleep(600)
"""


def long_text(sentences: int) -> str:
    return " ".join(
        f"Line {i} of the ledger notes that parcel {i} weighs {i % 17} kilograms."
        for i in range(sentences)
    )


def job_row(data_dir: Path, job_id: str) -> tuple[str, int, int, int]:
    """(status, attempts, chunks_done, chunks_total), read straight from the registry file."""
    with sqlite3.connect(f"file:{data_dir / 'registry.db'}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT status, attempts, chunks_done, chunks_total FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    return row if row else ("", 0, 0, 0)


def assert_consistent(service_data_dir: Path, tenant: str, ready: dict[str, int]) -> None:
    """Chroma holds exactly chunk_count vectors per ready document, with the chunk ids, and
    nothing else."""
    vectors = vector_metadata(service_data_dir, tenant)
    by_document: dict[str, set[str]] = {}
    for vector_id, metadata in vectors.items():
        by_document.setdefault(metadata["document_id"], set()).add(vector_id)
    assert by_document == {
        doc_id: {f"{doc_id}-{i}" for i in range(count)} for doc_id, count in ready.items()
    }


def test_a_process_killed_mid_embedding_is_repaired(
    tmp_path: Path, data_dir: Path, make_service: ServiceFactory
) -> None:
    source = tmp_path / "big.txt"
    source.write_text(long_text(250))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), str(source)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert child.stdout is not None
        job_id = child.stdout.readline().decode().strip()
        assert job_id.startswith("job_"), "the child process did not submit"
        deadline = time.monotonic() + 120
        while job_row(data_dir, job_id)[2] == 0:
            assert time.monotonic() < deadline, "no progress in the child process"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    status, attempts, done, total = job_row(data_dir, job_id)
    assert (status, attempts) == ("running", 1)
    assert 0 < done < total, "the kill did not land mid-embedding"
    # The dead process left vectors of a document that is not ready.
    assert len(vector_metadata(data_dir, TENANT)) >= done

    # Restarted with the default, longer chunks: the dead run wrote chunk ids the new run never
    # writes again, so only the retry's clean-up can remove them.
    service = make_service()
    job = service.wait_for_job(TENANT, job_id, 180)
    assert job.status == "succeeded", job
    assert job.chunks_done == job.chunks_total < done
    assert job_row(data_dir, job_id)[1] == 2  # the second attempt
    [doc_id] = job.document_ids
    document = service.get_document(TENANT, doc_id)
    assert (document.status, document.chunk_count) == ("ready", job.chunks_total)
    chunks = service.list_chunks(TENANT, doc_id, limit=100, cursor=None)
    assert [chunk.index for chunk in chunks.items] == list(range(job.chunks_total))
    assert_consistent(data_dir, TENANT, {doc_id: job.chunks_total})
    assert {m["m_shelf"] for m in vector_metadata(data_dir, TENANT).values()} == {3}


def test_a_job_interrupted_too_often_fails_and_leaves_no_vectors(
    data_dir: Path, make_service: ServiceFactory, embeddings: EmbeddingModel
) -> None:
    stopped = make_service(start=False)
    job = stopped.submit_ingest(TENANT, [text_item("Interrupted again and again.")])
    stopped.close()
    [doc_id] = job.document_ids
    # As a third crashed attempt leaves it: running, with some vectors written.
    with sqlite3.connect(data_dir / "registry.db") as db:
        db.execute("UPDATE jobs SET status = 'running', attempts = 3 WHERE id = ?", (job.id,))
    store = VectorStore(make_settings(data_dir), embeddings.model_id, embeddings.dimension)
    partial = Chunk(f"{doc_id}-0", doc_id, 0, "Interrupted", None, 0, 11)
    store.add(
        TENANT, [partial], embeddings.embed_documents([partial.text]), {partial.document_id: {}}
    )
    store.close()

    service = make_service()
    failed = service.get_job(TENANT, job.id)
    assert failed.status == "failed"
    assert failed.error is not None and failed.error.detail == "interrupted too often"
    document = service.get_document(TENANT, doc_id)
    assert (document.status, document.error) == ("failed", "interrupted too often")
    assert vector_metadata(data_dir, TENANT) == {}


def test_a_deletion_cut_short_is_finished_at_start(
    data_dir: Path, make_service: ServiceFactory
) -> None:
    service = make_service()
    job = ingest(service, TENANT, [text_item("Keep this one."), text_item("Delete this one.")])
    keep_id, doomed_id = job.document_ids
    keep_count = service.get_document(TENANT, keep_id).chunk_count
    service.close()
    originals = {p for p in (data_dir / "originals").rglob("*") if p.is_file()}
    # A crash right after the first step of a deletion.
    registry = Registry(make_settings(data_dir).resolved_registry_url, upgrade=True)
    assert registry.mark_deleting(TENANT, doomed_id) is not None
    registry.close()

    restarted = make_service()
    assert [d.id for d in restarted.list_documents(TENANT, limit=10, cursor=None).items] == [
        keep_id
    ]
    assert_consistent(data_dir, TENANT, {keep_id: keep_count})
    remaining = {p for p in (data_dir / "originals").rglob("*") if p.is_file()}
    assert len(remaining) == len(originals) - 2  # its original and its extracted text


def test_a_shutdown_mid_job_gives_the_job_back(
    data_dir: Path, make_service: ServiceFactory
) -> None:
    service = make_service(**SMALL_CHUNKS)
    job = service.submit_ingest(TENANT, [text_item(long_text(150))])
    deadline = time.monotonic() + 120
    while service.get_job(TENANT, job.id).chunks_done == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    started = time.monotonic()
    service.close()
    assert time.monotonic() - started < 10  # the worker stops after its current batch
    status, attempts, _, _ = job_row(data_dir, job.id)
    # Given back without counting as an attempt, unless it finished first; given back, it
    # leaves no vectors behind (the next run is a first attempt and cleans nothing up).
    assert (status, attempts) in (("queued", 0), ("succeeded", 1)), (status, attempts)
    if status == "queued":
        assert vector_metadata(data_dir, TENANT) == {}

    restarted = make_service(**SMALL_CHUNKS)
    finished = restarted.wait_for_job(TENANT, job.id, 180)
    assert finished.status == "succeeded"
    [doc_id] = finished.document_ids
    assert_consistent(data_dir, TENANT, {doc_id: finished.chunks_total})
