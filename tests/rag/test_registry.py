"""The registry on its own, on SQLite and on PostgreSQL alike: pagination, filters, cursors,
deduplication, job claims and leases, and writes and claims from many threads at once."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from impl.db import open_database
from impl.errors import Conflict, IdempotencyKeyReused, InvalidInput
from impl.rag.documents import NewDocument
from impl.rag.job_queue import DocumentWork, LeaseLost
from impl.rag.registry import Registry
from impl.rag.spaces import Move, Space
from impl.rag.types import Chunk, Document, JobError

LEASE = timedelta(minutes=1)


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    registry = Registry(registry_url, upgrade=True)
    yield registry
    registry.close()


def new_document(content: str, title: str | None = None) -> NewDocument:
    sha = hashlib.sha256(content.encode()).hexdigest()
    return NewDocument(
        sha256=sha,
        title=title or content,
        filename=None,
        media_type="text/plain",
        size_bytes=len(content),
        original_key=sha,
        extracted_key=hashlib.sha256(b"x" + content.encode()).hexdigest(),
        metadata={},
    )


def all_pages(registry: Registry, tenant: str, limit: int, **filters: object) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = registry.list_documents(tenant, limit=limit, cursor=cursor, **filters)  # type: ignore[arg-type]
        pages.append([doc.id for doc in page.items])
        if page.next_cursor is None:
            return pages
        cursor = page.next_cursor


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'registry.db'}")
    with database.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    database.close()


def test_pagination_is_newest_first_without_overlap_or_gaps(registry: Registry) -> None:
    ids = []
    for number in range(11):
        ids.extend(registry.register_ingest("t", [new_document(f"doc {number}")]).document_ids)
    # Two documents of one request share created_at: the id breaks the tie.
    ids.extend(registry.register_ingest("t", [new_document("a"), new_document("b")]).document_ids)
    documents = [registry.get_document("t", doc_id) for doc_id in ids]
    expected = [
        doc.id
        for doc in sorted(
            (d for d in documents if d is not None),
            key=lambda d: (d.created_at, d.id),
            reverse=True,
        )
    ]
    pages = all_pages(registry, "t", limit=4)
    assert [len(page) for page in pages] == [4, 4, 4, 1]
    assert [doc_id for page in pages for doc_id in page] == expected
    assert all_pages(registry, "t", limit=13) == [expected]


def test_list_filters(registry: Registry) -> None:
    first = registry.register_ingest("t", [new_document("one", "Annual REPORT 2023")])
    boundary = datetime.now(UTC)
    second = registry.register_ingest(
        "t", [new_document("two", "report_2 draft"), new_document("three", "100% done")]
    )
    registry.mark_ready(second.document_ids[0], 3)

    def ids(**filters: object) -> set[str]:
        return {doc_id for page in all_pages(registry, "t", 2, **filters) for doc_id in page}

    assert ids(title_contains="report") == {first.document_ids[0], second.document_ids[0]}
    # LIKE wildcards in the search text are literal characters.
    assert ids(title_contains="t_2") == {second.document_ids[0]}
    assert ids(title_contains="100%") == {second.document_ids[1]}
    assert ids(status="ready") == {second.document_ids[0]}
    assert ids(status="pending") == {first.document_ids[0], second.document_ids[1]}
    assert ids(created_before=boundary) == {first.document_ids[0]}
    assert ids(created_after=boundary) == set(second.document_ids)
    assert ids(created_after=boundary, title_contains="report") == {second.document_ids[0]}


@pytest.mark.parametrize(
    "cursor",
    [
        "not base64 at all!",
        base64.urlsafe_b64encode(b"not json").decode(),
        base64.urlsafe_b64encode(b"[1, 2]").decode(),
        base64.urlsafe_b64encode(b'{"t": 5, "i": "x"}').decode(),
        base64.urlsafe_b64encode(b'{"t": "yesterday", "i": "x"}').decode(),
        base64.urlsafe_b64encode(b'{"t": "2024-01-01T00:00:00", "i": "x"}').decode(),
        base64.urlsafe_b64encode(b'{"n": 3}').decode(),  # a chunk cursor
    ],
)
def test_malformed_document_cursor_is_invalid_input(registry: Registry, cursor: str) -> None:
    with pytest.raises(InvalidInput, match="cursor"):
        registry.list_documents("t", limit=5, cursor=cursor)


def test_malformed_chunk_cursor_is_invalid_input(registry: Registry) -> None:
    job = registry.register_ingest("t", [new_document("x")])
    for cursor in ("%%%", base64.urlsafe_b64encode(b'{"n": "3"}').decode()):
        with pytest.raises(InvalidInput, match="cursor"):
            registry.list_chunks("t", job.document_ids[0], limit=5, cursor=cursor)


def test_duplicates_map_to_the_existing_document(registry: Registry) -> None:
    first = registry.register_ingest("t", [new_document("same")])
    assert first.status == "queued"
    again = registry.register_ingest("t", [new_document("same"), new_document("new")])
    assert again.document_ids[0] == first.document_ids[0]
    assert again.duplicate_document_ids == [first.document_ids[0]]
    assert again.status == "queued"
    only_duplicates = registry.register_ingest("t", [new_document("same")])
    assert only_duplicates.status == "succeeded"
    # The same bytes twice in one request make one document, not a duplicate of itself.
    twice = registry.register_ingest("t", [new_document("fresh"), new_document("fresh")])
    assert len(twice.document_ids) == 1
    assert twice.duplicate_document_ids == []
    # Another tenant's identical bytes are its own document.
    other = registry.register_ingest("u", [new_document("same")])
    assert other.duplicate_document_ids == []
    # A failed document does not block trying the same file again.
    registry.mark_failed(first.document_ids[0], "broken")
    retry = registry.register_ingest("t", [new_document("same")])
    assert retry.duplicate_document_ids == []
    assert retry.document_ids != first.document_ids


def test_tenants_do_not_see_each_others_rows(registry: Registry) -> None:
    job = registry.register_ingest("t", [new_document("x")])
    doc_id = job.document_ids[0]
    assert registry.get_document("u", doc_id) is None
    assert registry.get_job("u", job.id) is None
    assert registry.list_chunks("u", doc_id, limit=5, cursor=None) is None
    assert registry.mark_deleting("u", doc_id) is None
    assert registry.list_documents("u", limit=5, cursor=None).items == []
    assert isinstance(registry.get_document("t", doc_id), Document)


def test_a_job_is_claimed_once_and_oldest_first(registry: Registry) -> None:
    first = registry.register_ingest("t", [new_document("1")])
    second = registry.register_ingest("t", [new_document("2")])
    claimed = registry.claim_job(None, "worker-a", LEASE)
    assert claimed is not None and claimed.id == first.id and claimed.attempt == 1
    assert registry.claim_job(first.id, "worker-b", LEASE) is None
    assert registry.get_job("t", first.id).status == "running"  # type: ignore[union-attr]
    again = registry.claim_job(None, "worker-b", LEASE)
    assert again is not None and again.id == second.id
    assert registry.claim_job(None, "worker-c", LEASE) is None


def new_work(doc_id: str) -> DocumentWork:
    """What a worker indexes of a new document (tenant "t")."""
    return DocumentWork(id=doc_id, tenant="t", extracted_key="", metadata={})


def test_progress_needs_the_lease(registry: Registry) -> None:
    job = registry.register_ingest("t", [new_document("x")])
    doc_id = job.document_ids[0]
    registry.claim_job(job.id, "owner", LEASE)
    registry.start_progress(job.id, "owner", LEASE, total=2, work=registry.job_work(job.id))
    chunk = Chunk(f"{doc_id}-0", doc_id, 0, "text", None, 0, 4)
    assert registry.add_chunks(job.id, "owner", LEASE, [(new_work(doc_id), [chunk])]) == [True]
    assert registry.get_job("t", job.id).chunks_done == 1  # type: ignore[union-attr]
    second = Chunk(f"{doc_id}-1", doc_id, 1, "more", None, 4, 8)
    with pytest.raises(LeaseLost):
        registry.add_chunks(job.id, "intruder", LEASE, [(new_work(doc_id), [second])])
    # The refused write left nothing behind.
    page = registry.list_chunks("t", doc_id, limit=10, cursor=None)
    assert page is not None and [c.index for c in page.items] == [0]
    with pytest.raises(LeaseLost):
        registry.finish_job(job.id, "intruder", None)
    with pytest.raises(LeaseLost):
        registry.renew_lease(job.id, "intruder", LEASE)
    registry.finish_job(job.id, "owner", None)
    assert registry.get_job("t", job.id).status == "succeeded"  # type: ignore[union-attr]
    # A heartbeat that saw the job in hand before it ended renews nothing and loses nothing
    # (it logged "lease taken by another worker" for a job no one else ever had).
    registry.renew_lease(job.id, "owner", LEASE)


def test_chunks_are_refused_once_deletion_began(registry: Registry) -> None:
    job = registry.register_ingest("t", [new_document("x")])
    doc_id = job.document_ids[0]
    registry.claim_job(job.id, "owner", LEASE)
    target = registry.mark_deleting("t", doc_id)
    assert target is not None
    # Asked again (a DELETE retried after an outage stopped the first), it is still to finish.
    assert registry.mark_deleting("t", doc_id) == target
    chunk = Chunk(f"{doc_id}-0", doc_id, 0, "text", None, 0, 4)
    assert registry.add_chunks(job.id, "owner", LEASE, [(new_work(doc_id), [chunk])]) == [False]
    assert not registry.mark_ready(doc_id, 1)
    assert registry.get_document("t", doc_id) is None


def test_documents_recorded_together_are_refused_one_by_one(registry: Registry) -> None:
    """Small documents' chunks are recorded in one transaction; one whose deletion began is
    refused without its neighbours, and the job counts only what was recorded."""
    job = registry.register_ingest("t", [new_document("x"), new_document("y")])
    kept, deleted = job.document_ids
    registry.claim_job(job.id, "owner", LEASE)
    registry.start_progress(job.id, "owner", LEASE, total=3, work=registry.job_work(job.id))
    assert registry.mark_deleting("t", deleted) is not None
    written = [
        (
            new_work(kept),
            [Chunk(f"{kept}-{i}", kept, i, f"kept {i}", None, i, i + 1) for i in (0, 1)],
        ),
        (new_work(deleted), [Chunk(f"{deleted}-0", deleted, 0, "gone", None, 0, 4)]),
    ]
    assert registry.add_chunks(job.id, "owner", LEASE, written) == [True, False]
    assert registry.get_job("t", job.id).chunks_done == 2  # type: ignore[union-attr]
    page = registry.list_chunks("t", kept, limit=10, cursor=None)
    assert page is not None and [c.text for c in page.items] == ["kept 0", "kept 1"]
    assert registry.get_chunks("t", [f"{deleted}-0"]) == {}


def test_chunk_pages_follow_the_index(registry: Registry) -> None:
    job = registry.register_ingest("t", [new_document("x")])
    doc_id = job.document_ids[0]
    registry.claim_job(job.id, "owner", LEASE)
    chunks = [Chunk(f"{doc_id}-{i}", doc_id, i, f"c{i}", 1, i, i + 1) for i in range(7)]
    # Written out of order, read back by index.
    registry.add_chunks(job.id, "owner", LEASE, [(new_work(doc_id), chunks[4:])])
    registry.add_chunks(job.id, "owner", LEASE, [(new_work(doc_id), chunks[:4])])
    seen, cursor = [], None
    while True:
        page = registry.list_chunks("t", doc_id, limit=3, cursor=cursor)
        assert page is not None
        seen.extend(chunk.index for chunk in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == list(range(7))


def test_release_does_not_count_as_an_attempt(registry: Registry) -> None:
    job = registry.register_ingest("t", [new_document("x")])
    registry.claim_job(job.id, "owner", LEASE)
    registry.release_job(job.id, "owner")
    claimed = registry.claim_job(job.id, "owner", LEASE)
    assert claimed is not None and claimed.attempt == 1


def test_interrupted_jobs_are_requeued_then_given_up(registry: Registry) -> None:
    job = registry.register_ingest("t", [new_document("x")])
    doc_id = job.document_ids[0]
    for attempt in (1, 2, 3):
        claimed = registry.claim_job(job.id, "owner", LEASE)
        assert claimed is not None and claimed.attempt == attempt
        # The lease is still valid: only a sole process may treat it as interrupted.
        assert registry.find_interrupted(every_running=False, max_attempts=3) == []
        [found] = registry.find_interrupted(every_running=True, max_attempts=3)
        assert found.document_ids == [doc_id]
        assert found.gives_up == (attempt == 3)
        assert found.lease_owner == "owner"
        if not found.gives_up:
            # Of two processes reclaiming it, the one naming the holder it saw wins.
            assert registry.requeue(job.id, "owner")
            assert not registry.requeue(job.id, "owner")
    registry.give_up(job.id, [doc_id], JobError("Ingestion interrupted", "interrupted too often"))
    finished = registry.get_job("t", job.id)
    assert finished is not None and finished.status == "failed"
    assert finished.error == JobError("Ingestion interrupted", "interrupted too often")
    document = registry.get_document("t", doc_id)
    assert document is not None and document.status == "failed"


def test_expired_leases_count_as_interrupted(registry: Registry) -> None:
    job = registry.register_ingest("t", [new_document("x")])
    registry.claim_job(job.id, "owner", timedelta(seconds=-1))
    [found] = registry.find_interrupted(every_running=False, max_attempts=3)
    assert found.job_id == job.id


def test_the_first_model_is_the_default_space_and_a_switch_moves_one_tenant(
    registry: Registry,
) -> None:
    registry.record_default_model("model-a", 384)
    registry.record_default_model("model-b", 768)  # recorded once: the first stands
    assert registry.current_space("t") == Space("model-a", 384, default=True)
    target = Space("model-b", 768)
    move = registry.begin_move("t", target)
    assert registry.begin_move("t", target) == move  # asked again: the same move
    registry.record_move_progress(replace(move, chunks_done=3, chunks_total=5))
    assert registry.moves() == [Move("t", target, 3, 5)]
    assert registry.current_space("t").model_id == "model-a"  # until the switch
    registry.switch_space("t", target)
    assert registry.current_space("t") == target
    assert registry.move_of("t") is not None  # until its last step
    registry.finish_move("t")
    assert registry.move_of("t") is None
    assert registry.current_space("other") == Space("model-a", 384, default=True)


def test_concurrent_writers_wait_instead_of_failing(registry: Registry) -> None:
    """Threads register, claim and delete at once: SQLite's lock is taken up front and waited
    for, so no "database is locked" reaches a caller."""
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for number in range(15):
                job = registry.register_ingest("t", [new_document(f"{worker}-{number}")])
                registry.claim_job(None, f"w{worker}", LEASE)
                registry.mark_deleting("t", job.document_ids[0])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(registry.being_deleted()) == 90


def test_many_claimers_at_once_never_run_a_job_twice(registry: Registry) -> None:
    """Threads claim the oldest queued job, again and again, all at once (FOR UPDATE SKIP
    LOCKED on PostgreSQL, a conditional update on SQLite): each job is claimed exactly once."""
    jobs = [registry.register_ingest("t", [new_document(f"job {n}")]).id for n in range(60)]
    claims: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def claim(worker: int) -> None:
        try:
            start.wait()
            while True:
                claimed = registry.claim_job(None, f"w{worker}", LEASE)
                if claimed is not None:
                    claims.append(claimed.id)
                elif not registry.queued_job_ids(1):  # not a race lost: nothing is left
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(claims) == sorted(jobs)
    assert registry.queued_job_ids(100) == []


def test_a_claim_on_postgresql_skips_a_row_another_claimer_holds(postgres_url: str) -> None:
    registry = Registry(postgres_url, upgrade=True)
    first = registry.register_ingest("t", [new_document("1")])
    second = registry.register_ingest("t", [new_document("2")])
    holder = create_engine(postgres_url)
    try:
        with holder.begin() as connection:
            # Another claimer's transaction has the oldest job locked and has not committed.
            connection.execute(
                text("SELECT id FROM jobs WHERE id = :id FOR UPDATE"), {"id": first.id}
            )
            claimed = registry.claim_job(None, "worker-b", LEASE)
            assert claimed is not None and claimed.id == second.id
    finally:
        holder.dispose()
        registry.close()


def test_processes_starting_at_once_record_the_model_once(registry: Registry) -> None:
    """What every server process does at start, all at once on a new registry: the first
    records the model, the others find it recorded (none fails on the duplicate)."""
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def check() -> None:
        try:
            start.wait()
            registry.record_default_model("model-a", 384)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert registry.current_space("t") == Space("model-a", 384, default=True)


def ready(registry: Registry, content: str) -> str:
    """A ready document of tenant "t" holding ``content``."""
    job = registry.register_ingest("t", [new_document(content)])
    doc_id = job.document_ids[0]
    assert registry.mark_ready(doc_id, 0)
    return doc_id


def test_a_swap_moves_the_replacement_onto_the_document_in_one_step(registry: Registry) -> None:
    doc_id = ready(registry, "old")
    job = registry.register_replacement(
        "t", doc_id, new_document("new"), title=None, metadata={"k": 1}, if_match=None
    )
    assert job.status == "queued" and registry.being_replaced(doc_id)
    [work] = registry.job_work(job.id)
    assert (work.id, work.version, work.replacement, work.metadata) == (doc_id, 2, True, {"k": 1})
    # Until the swap, the document is the old version.
    assert registry.get_document("t", doc_id).version == 1  # type: ignore[union-attr]
    retired = registry.swap_version(doc_id, 2)
    assert retired is not None and retired.version == 1
    document = registry.get_document("t", doc_id)
    assert document is not None
    assert (document.version, document.sha256) == (2, hashlib.sha256(b"new").hexdigest())
    assert document.metadata == {"k": 1} and not registry.being_replaced(doc_id)
    assert [r.version for r in registry.retired_versions()] == [1]
    # A second swap of the same replacement finds nothing to do.
    assert registry.swap_version(doc_id, 2) is None


def test_a_replacement_whose_job_ended_is_found_abandoned(registry: Registry) -> None:
    doc_id = ready(registry, "kept")
    job = registry.register_replacement(
        "t", doc_id, new_document("dropped"), title=None, metadata=None, if_match=None
    )
    assert registry.abandoned_replacements() == []
    cancelled = registry.cancel_job("t", job.id)
    assert cancelled is not None and cancelled[0].status == "cancelled"
    assert cancelled[2] == [(doc_id, 2)]
    # The process died before dropping it: the next start finds it.
    assert registry.abandoned_replacements() == [("t", doc_id, 2)]
    dropped = new_document("dropped")
    assert registry.drop_replacement(doc_id, 2) == (dropped.original_key, dropped.extracted_key)
    assert registry.abandoned_replacements() == [] and not registry.being_replaced(doc_id)


def test_an_idempotency_key_replays_refuses_and_expires(registry: Registry) -> None:
    day, minute = timedelta(days=1), timedelta(minutes=1)
    assert registry.claim_idempotency_key("t", "k", "f1", ttl=day, in_flight=minute) is None
    with pytest.raises(Conflict):  # the first request is still being answered
        registry.claim_idempotency_key("t", "k", "f1", ttl=day, in_flight=minute)
    registry.record_response("t", "k", 202, '{"job": {}}')
    replay = registry.claim_idempotency_key("t", "k", "f1", ttl=day, in_flight=minute)
    assert replay is not None and (replay.status_code, replay.body) == (202, '{"job": {}}')
    with pytest.raises(IdempotencyKeyReused):
        registry.claim_idempotency_key("t", "k", "f2", ttl=day, in_flight=minute)
    # Another tenant's key of the same name is its own.
    assert registry.claim_idempotency_key("u", "k", "f2", ttl=day, in_flight=minute) is None
    # Past its time the key is forgotten, and so is a first request that never answered.
    assert (
        registry.claim_idempotency_key("t", "k", "f2", ttl=timedelta(0), in_flight=minute) is None
    )
    assert registry.claim_idempotency_key("t", "k", "f3", ttl=day, in_flight=timedelta(0)) is None
