"""The event log on SQLite and on PostgreSQL alike: written with the changes it reports, read
after an id per job and per tenant, ids seen in order while many transactions write at once,
and old events removed as jobs finish."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from impl.rag.job_queue import DocumentWork
from impl.rag.registry import Registry
from impl.rag.types import Chunk, JobError
from tests.rag.test_registry import LEASE, new_document


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    registry = Registry(registry_url, upgrade=True)
    yield registry
    registry.close()


def run_job(registry: Registry, tenant: str, content: str, error: JobError | None = None) -> str:
    """A job of one document run by a worker: claimed, two chunks, ready, finished."""
    job = registry.register_ingest(tenant, [new_document(content)])
    doc_id = job.document_ids[0]
    registry.claim_job(job.id, "owner", LEASE)
    registry.start_progress(job.id, "owner", LEASE, total=2, work=registry.job_work(job.id))
    work = DocumentWork(id=doc_id, tenant=tenant, extracted_key="", metadata={})
    chunks = [Chunk(f"{doc_id}-{i}", doc_id, i, f"text {i}", None, 0, 6) for i in range(2)]
    assert registry.add_chunks(job.id, "owner", LEASE, [(work, chunks)]) == [True]
    registry.mark_ready(doc_id, 2)
    registry.finish_job(job.id, "owner", error)
    return job.id


def test_a_jobs_events_come_in_the_order_of_its_changes(registry: Registry) -> None:
    job_id = run_job(registry, "t", "x")
    logged = registry.job_events("t", job_id, after=0, limit=100)
    assert logged is not None and logged.finished
    events = logged.events
    assert [e.type for e in events] == [
        "job.queued",
        "job.running",
        "job.progress",
        "job.progress",
        "document.ready",
        "job.finished",
    ]
    assert [e.data for e in events[1:4]] == [
        {"attempt": 1},
        {"chunks_done": 0, "chunks_total": 2},
        {"chunks_done": 2, "chunks_total": 2},
    ]
    assert events[-1].data == {"status": "succeeded", "error": None}
    ids = [e.id or 0 for e in events]
    assert ids == sorted(set(ids))
    # After an id: what followed it, and no more once the job's last is passed.
    later = registry.job_events("t", job_id, after=ids[2], limit=100)
    assert later is not None and later.events == events[3:] and later.finished
    page = registry.job_events("t", job_id, after=0, limit=2)
    assert page is not None and page.events == events[:2] and not page.finished
    # Another tenant has no such job.
    assert registry.job_events("other", job_id, after=0, limit=100) is None
    # The tenant's document events, and none of another tenant's.
    run_job(registry, "other", "y")
    documents = registry.tenant_events("t", after=0, job_ids=[], documents=True, limit=100)
    assert [(e.type, e.job_id) for e in documents] == [("document.ready", job_id)]


def test_failures_and_cancellations_are_events_too(registry: Registry) -> None:
    failing = registry.register_ingest("t", [new_document("bad")])
    registry.claim_job(failing.id, "owner", LEASE)
    registry.mark_failed(failing.document_ids[0], "the document holds no text to index")
    registry.finish_job(failing.id, "owner", JobError("Ingestion failed", "1 document(s)"))
    waiting = registry.register_ingest("t", [new_document("later")])
    registry.cancel_job("t", waiting.id)
    for job_id, status, reason in (
        (failing.id, "failed", "the document holds no text to index"),
        (waiting.id, "cancelled", "ingestion was cancelled"),
    ):
        logged = registry.job_events("t", job_id, after=0, limit=100)
        assert logged is not None and logged.finished
        failed, finished = logged.events[-2:]
        assert failed.type == "document.failed" and failed.data == {"reason": reason}
        assert finished.type == "job.finished" and finished.data["status"] == status


def test_readers_never_skip_an_id_while_many_transactions_write(registry: Registry) -> None:
    """Ids are handed out in one order and committed in another unless the writers take turns
    (PostgreSQL); a reader that polls after the last id it saw would skip the late ones."""
    writers, jobs_each = 4, 15
    done = threading.Event()
    seen: list[int] = []

    def write(number: int) -> None:
        for job in range(jobs_each):
            created = registry.register_ingest("t", [new_document(f"w{number}-{job}")])
            registry.mark_failed(created.document_ids[0], "no text")

    def read() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            for event in registry.tenant_events(
                "t", after=cursor, job_ids=[], documents=True, limit=100
            ):
                seen.append(event.id or 0)
                cursor = event.id or cursor
            if finished:
                return
            time.sleep(0.001)

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    reader.join()
    logged = registry.tenant_events("t", after=0, job_ids=[], documents=True, limit=1000)
    assert len(logged) == writers * jobs_each
    assert seen == [e.id for e in logged]


def test_events_past_the_retention_go_when_a_job_finishes(registry_url: str) -> None:
    registry = Registry(registry_url, upgrade=True, event_retention=timedelta(seconds=1))
    try:
        old = run_job(registry, "t", "old")
        time.sleep(1.5)
        new = run_job(registry, "t", "new")
        # The old job's events are gone; its outcome is made from the job itself.
        gone = registry.job_events("t", old, after=0, limit=100)
        assert gone is not None and gone.finished
        [finished] = gone.events
        assert finished.id is None and finished.type == "job.finished"
        assert finished.data == {"status": "succeeded"}
        kept = registry.job_events("t", new, after=0, limit=100)
        assert kept is not None and len(kept.events) == 6
    finally:
        registry.close()
