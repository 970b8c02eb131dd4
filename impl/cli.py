"""The `ragapi` command: the server, and the RAG services in-process (no server needed).

Each command imports what it uses when it runs: `ragapi --help`, `documents list` and `keys list`
touch no model, and `search` and `query` load only the embedding model and the stores. Adding a
command is a function taking the parsed arguments and a block in `parser()`."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from impl.errors import ConfigurationError, InvalidInput, NotFound, RagapiError

if TYPE_CHECKING:
    from tqdm import tqdm

    from impl.rag.events import Event
    from impl.rag.registry import Registry
    from impl.rag.service import RagService
    from impl.rag.types import Job, RetrievalMode, RetrievalOptions
    from impl.settings import Settings

TENANT = "default"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's switch to multiprocess mode
# The longest an ingest of one file is followed; a job still running then is reported as such.
INGEST_FOLLOW_SECONDS = 3600.0
PROGRESS_SLICE_SECONDS = 0.25


def load_settings() -> Settings:
    """The settings, the data directory they name told once, so that a command run from
    another folder does not go unnoticed on an empty `./data`."""
    from impl.settings import Settings

    settings = Settings()
    print(f"ragapi: data directory {settings.data_dir.resolve()}", file=sys.stderr)
    return settings


def holds_data(settings: Settings) -> bool:
    """False when nothing was ever stored under these settings: commands that only read then
    say so instead of creating an empty data directory."""
    return settings.registry_url is not None or (settings.data_dir / "registry.db").exists()


def limit_malloc_arenas() -> None:
    """Two malloc arenas for the process instead of glibc's up to eight per core: each thread
    that allocates otherwise gets an arena of its own, which keeps what it freed. Measured at
    10k chunks, 32 threads searching at once added 47 MB of resident memory with the default
    and 22 MB with two arenas; allocation is not what a search waits on."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: its own allocator, its own policy
    m_arena_max = -8  # from glibc's malloc.h
    libc.mallopt(m_arena_max, 2)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from impl.api.app import create_app

    # Flags override the environment; they go through it so that worker processes, which
    # build their own app, see them too.
    for flag in ("host", "port", "workers", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            os.environ[f"RAGAPI_{flag.upper()}"] = str(value)
    settings = load_settings()
    if settings.workers > 1 and settings.chroma_url is None:
        raise ConfigurationError(
            "several workers need a Chroma server: embedded Chroma is not process-safe; "
            "set RAGAPI_CHROMA_URL (see the README's deployment section)"
        )
    if settings.workers > 1 and settings.rate_limit_storage_url == "memory://":
        raise ConfigurationError(
            "several workers need a shared rate-limit storage: counted in memory, each worker "
            "would grant the whole budget; set RAGAPI_RATE_LIMIT_STORAGE_URL=redis://host:6379"
        )
    limit_malloc_arenas()
    app = create_app(settings)  # checks the spec against the handler map before serving
    # Once, before any worker starts: the embedded registry is upgraded here, and a server's
    # registry left at an older schema stops the start with the command that upgrades it.
    prepare_registry(settings)
    if settings.auth_enabled:
        bootstrap_admin_key(settings)
    common = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "server_header": False,  # a version is an attacker's head start
        "access_log": False,  # the JSON access line (impl/api/middleware.py) logs each request
        # By name, so that worker processes load it too: uvicorn's httptools protocol with a
        # deadline for each request's headers (RAGAPI_HEADER_TIMEOUT_SECONDS).
        "http": "impl.api.protocol:HeaderTimeoutProtocol",
    }
    if settings.workers == 1:
        uvicorn.run(app, **common)  # type: ignore[arg-type]
    else:
        # Before any worker starts: each one's metrics then go to files all of them read. A
        # folder named in the environment is also `ragapi worker` processes' on this machine,
        # so it is theirs to clear, not ours.
        if MULTIPROC_ENV not in os.environ:
            metrics_dir = settings.data_dir.resolve() / "prometheus"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            os.environ[MULTIPROC_ENV] = str(metrics_dir)
        uvicorn.run(
            "impl.api.app:app_from_environment",
            factory=True,
            workers=settings.workers,
            **common,  # type: ignore[arg-type]
        )
    return 0


def worker(args: argparse.Namespace) -> int:
    """Claim and run ingestion jobs from the registry until SIGTERM (or Ctrl-C), then finish or
    give back the jobs in hand within RAGAPI_WORKER_STOP_SECONDS."""
    import logging
    import signal
    import threading

    from impl.observability.endpoint import ProcessEndpoint
    from impl.observability.logs import configure_logging
    from impl.observability.metrics import Metrics
    from impl.rag.service import RagService

    settings = load_settings()
    if settings.ingest_workers == 0:
        raise ConfigurationError(
            "a worker runs RAGAPI_INGEST_WORKERS jobs at a time, and it is 0 here; set it to 1 "
            "or more for the worker (0 is for an API tier that only queues)"
        )
    if settings.chroma_url is None:
        raise ConfigurationError(
            "a worker writes vectors another process searches: set RAGAPI_CHROMA_URL to a "
            "Chroma server (embedded Chroma is not process-safe)"
        )
    configure_logging(settings.log_level)
    log = logging.getLogger("impl.worker")
    if settings.worker_nice and hasattr(os, "nice"):
        # Before any thread starts (onnxruntime's included): threads inherit it on Linux.
        os.nice(settings.worker_nice)
    stopping = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stopping.set())
    metrics = Metrics()
    service = RagService(settings, observer=metrics)
    endpoint = None
    try:
        service.start()
        if settings.worker_port:
            endpoint = ProcessEndpoint(
                settings.host, settings.worker_port, metrics, service.ingestion_alive
            )
            endpoint.start()
        log.info(
            "worker started: %d ingestion threads, %d onnxruntime threads (0: its choice), "
            "niceness %d",
            settings.ingest_workers,
            settings.embedding_threads,
            os.nice(0) if hasattr(os, "nice") else 0,
        )
        while not stopping.wait(1.0):
            pass
        log.info("worker stopping: jobs in hand finish their batch or go back to the queue")
    finally:
        service.close()
        if endpoint is not None:
            endpoint.close()
    log.info("worker stopped")
    return 0


def prepare_registry(settings: Settings) -> None:
    from impl.db import open_database

    database = open_database(settings.resolved_registry_url)
    try:
        database.ensure_schema(upgrade=settings.registry_upgrades_on_start)
    finally:
        database.close()


def db(args: argparse.Namespace) -> int:
    """Apply the registry's migrations (every one it lacks), whatever the URL."""
    from impl.db import open_database

    database = open_database(load_settings().resolved_registry_url)
    try:
        database.upgrade()
        print(f"registry schema at {database.revision()}")
    finally:
        database.close()
    return 0


def originals(args: argparse.Namespace) -> int:
    """Remove the stored originals no document references, and the pins and tombstones of
    uploads and deletions cut short (what a crash leaves in a folder store)."""
    from impl.rag.originals import LocalOriginalStore, open_originals

    settings = load_settings()
    if not holds_data(settings):
        print("nothing stored")
        return 0
    with open_registry(settings) as registry:
        store = open_originals(settings, registry.database)
        if not isinstance(store, LocalOriginalStore):
            print("the registry holds the originals, written and removed with their documents")
            return 0
        removed = store.sweep(args.min_age_seconds)
    print(f"{removed} unreferenced file(s) removed")
    return 0


def bootstrap_admin_key(settings: Settings) -> None:
    """On a first start there are no keys, so nobody could use the server: make an admin key
    and show it once. Done here, before the workers start, so several workers make one key;
    of servers starting at once on one empty database, one makes it."""
    from impl.security.keys import SCOPES, SqlKeyStore

    keys = SqlKeyStore(settings)
    try:
        created = keys.create_first(TENANT, "bootstrap admin", list(SCOPES))
        if created is not None:
            print(
                f"ragapi: no API key existed, so an admin key for tenant {TENANT!r} was made.\n"
                f"ragapi: it is shown this once; keep it:\n"
                f"X-API-Key: {created.secret}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        keys.close()


@contextmanager
def open_service(settings: Settings, start_workers: bool) -> Iterator[RagService]:
    from impl.rag.service import RagService

    service = RagService(settings)
    if start_workers:
        service.start()
    try:
        yield service
    finally:
        service.close()


@contextmanager
def open_registry(settings: Settings) -> Iterator[Registry]:
    """The document registry alone: listing and showing documents needs no model or vectors."""
    from impl.rag.registry import Registry

    registry = Registry(settings.resolved_registry_url, upgrade=settings.registry_upgrades_on_start)
    try:
        yield registry
    finally:
        registry.close()


def files_under(paths: Sequence[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


# -- ingest -----------------------------------------------------------------------------------


@dataclass
class IngestSummary:
    ingested: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def report(self) -> int:
        """Prints the closing summary and names every failure; the exit status."""
        duplicates = "duplicate" if len(self.duplicates) == 1 else "duplicates"
        print(
            f"{len(self.ingested)} ingested, {len(self.duplicates)} {duplicates} (already held), "
            f"{len(self.failed)} failed"
        )
        if not self.failed:
            return 0
        print(f"ragapi: {len(self.failed)} of them failed:", file=sys.stderr)
        for path, reason in self.failed:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1


def ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    metadata = json.loads(args.metadata) if args.metadata else {}
    files = list(files_under(args.paths))
    if not files:
        raise InvalidInput(f"no files under {' '.join(args.paths)}")
    settings = load_settings()
    summary = IngestSummary()
    # Bars only for a person watching; the per-file lines and the summary always.
    quiet = not sys.stderr.isatty()
    with (
        open_service(settings, start_workers=True) as service,
        tqdm(total=len(files), unit="file", position=0, disable=quiet) as file_bar,
        tqdm(unit="chunk", position=1, leave=False, disable=quiet) as chunk_bar,
    ):
        for path in files:
            file_bar.set_postfix_str(path.name, refresh=True)
            line = ingest_file(service, path, args.title, metadata, chunk_bar, summary)
            tqdm.write(line, file=sys.stdout)
            file_bar.update()
    return summary.report()


def ingest_file(
    service: RagService,
    path: Path,
    title: str | None,
    metadata: dict[str, Any],
    chunk_bar: tqdm[Any],
    summary: IngestSummary,
) -> str:
    """Ingests one file, following its chunks on `chunk_bar`; the line that tells how it went."""
    from impl.rag.types import IngestItem

    chunk_bar.reset()
    chunk_bar.total = None  # unknown until the file is read and cut (reset keeps the last one)
    chunk_bar.set_description_str("reading")
    try:
        item = IngestItem(path.read_bytes(), path.name, title, metadata)
        job = service.submit_ingest(TENANT, [item])
        job = follow(service, job, chunk_bar)
    except OSError as exc:
        summary.failed.append((path, exc.strerror or str(exc)))
        return f"{path}: failed: {exc.strerror or exc}"
    except RagapiError as exc:
        reason = exc.detail.removeprefix(f"{path.name}: ")  # the path says which file
        summary.failed.append((path, reason))
        return f"{path}: failed: {reason}"
    ids = " ".join(job.document_ids)
    if job.status == "succeeded" and job.duplicate_document_ids:
        summary.duplicates.append(path)
        return f"{path}: succeeded {ids} (duplicate)"
    if job.status == "succeeded":
        summary.ingested.append(path)
        return f"{path}: succeeded {ids}"
    reason = job.error.detail if job.error else f"not finished in {INGEST_FOLLOW_SECONDS:.0f} s"
    summary.failed.append((path, reason))
    return f"{path}: {job.status} {ids}: {reason}"


def follow(service: RagService, job: Job, chunk_bar: tqdm[Any], tenant: str = TENANT) -> Job:
    """Waits for the job, showing its chunks as they are indexed."""
    from impl.rag.types import FINISHED_JOB_STATUSES

    chunk_bar.set_description_str("indexing")
    deadline = time.monotonic() + INGEST_FOLLOW_SECONDS
    while job.status not in FINISHED_JOB_STATUSES and time.monotonic() < deadline:
        job = service.wait_for_job(tenant, job.id, timeout_s=PROGRESS_SLICE_SECONDS)
        if job.chunks_total:
            chunk_bar.total = job.chunks_total
            chunk_bar.update(job.chunks_done - chunk_bar.n)
    return job


# -- retrieval --------------------------------------------------------------------------------


def retrieval(mode: RetrievalMode) -> RetrievalOptions:
    from impl.rag.types import RetrievalOptions

    return RetrievalOptions(mode=mode)


def query(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not holds_data(settings):
        print("no documents")
        return 0
    with open_service(settings, start_workers=False) as service:
        answer = service.answer(
            TENANT, args.question, top_k=args.top_k, retrieval=retrieval(args.mode)
        )
    print(answer.answer)
    for citation in answer.citations:
        page = f", page {citation.page}" if citation.page else ""
        print(f"[{citation.marker}] {citation.document_title}{page}: {citation.quote}")
    return 0


def search(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not holds_data(settings):
        print("no documents")
        return 0
    with open_service(settings, start_workers=False) as service:
        hits = service.search(TENANT, args.query, top_k=args.top_k, retrieval=retrieval(args.mode))
    for hit in hits:
        signals = " ".join(
            f"{name} #{found.rank} {found.score:.3f}" for name, found in hit.explain.items()
        )
        print(f"{hit.score:.4f} ({signals})  {hit.document_title} #{hit.chunk.index}:")
        print(f"    {hit.chunk.text[:200]}")
    if not hits:
        print("no passages found")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from impl.rag import evaluation
    from impl.rag.service import RagService
    from impl.rag.types import RetrievalOptions
    from impl.settings import Settings

    questions = evaluation.load_questions(Path(args.questions))
    dense_weight, lexical_weight = args.weights
    fusion = RetrievalOptions(
        dense_weight=dense_weight,
        lexical_weight=lexical_weight,
        rrf_k=args.rrf_k,
        candidates=args.candidates,
    )
    target: evaluation.Target
    if args.url:
        if args.docs:
            raise ConfigurationError("--docs is for an in-process run; a server has its own")
        target = evaluation.HttpTarget(
            args.url, args.api_key or os.environ.get("RAGAPI_API_KEY", "")
        )
        report = evaluation.evaluate(target, questions, args.modes, args.top_k, fusion)
    elif args.docs:
        # A throwaway store: the documents alone, whatever RAGAPI_DATA_DIR holds.
        with tempfile.TemporaryDirectory(prefix="ragapi-eval-") as scratch:
            settings = Settings(data_dir=Path(scratch), registry_url=None, chroma_url=None)
            service = RagService(settings)
            try:
                service.start()
                evaluation.ingest_folder(service, TENANT, Path(args.docs))
                target = evaluation.ServiceTarget(service, TENANT)
                report = evaluation.evaluate(target, questions, args.modes, args.top_k, fusion)
            finally:
                service.close()
    else:
        with open_service(load_settings(), start_workers=False) as service:
            target = evaluation.ServiceTarget(service, TENANT)
            report = evaluation.evaluate(target, questions, args.modes, args.top_k, fusion)
    print(evaluation.as_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(evaluation.as_json(report), indent=2) + "\n")
    return 0


def retrieval_modes(text: str) -> list[str]:
    from impl.rag.evaluation import MODES

    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes are a comma-separated list of {', '.join(MODES)}")
    return modes


def fusion_weights(text: str) -> tuple[float, float]:
    try:
        dense, lexical = (float(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("weights are DENSE,LEXICAL, e.g. 1,1") from None
    return dense, lexical


# -- documents and keys -----------------------------------------------------------------------


def documents(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not holds_data(settings):
        if args.action == "list":
            print("no documents")
            return 0
        raise NotFound(f"document {args.doc_id} not found")
    if args.action == "delete":
        with open_service(settings, start_workers=False) as service:
            service.delete_document(TENANT, args.doc_id)
        print(f"deleted {args.doc_id}")
        return 0
    if args.action == "replace":
        return replace_document(settings, args)
    if args.action == "patch":
        return patch_document(settings, args)
    if args.action == "reindex":
        return reindex_document(settings, args)
    with open_registry(settings) as registry:
        if args.action == "show":
            document = registry.get_document(TENANT, args.doc_id)
            if document is None:
                raise NotFound(f"document {args.doc_id} not found")
            print(json.dumps(vars(document), default=str, indent=2))
            return 0
        cursor, listed = None, 0
        while True:
            page = registry.list_documents(TENANT, limit=100, cursor=cursor)
            for d in page.items:
                print(f"{d.id}  {d.status:<7}  {d.chunk_count:>5} chunks  {d.title}")
            listed += len(page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    if not listed:
        print("no documents")
    return 0


def replace_document(settings: Settings, args: argparse.Namespace) -> int:
    """A new version of the document from a file, followed until it is swapped in."""
    from tqdm import tqdm

    from impl.rag.types import IngestItem

    path = Path(args.path)
    metadata = json.loads(args.metadata) if args.metadata else None
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{path}: {exc.strerror or exc}") from None
    item = IngestItem(content, path.name, args.title, metadata or {})
    with (
        open_service(settings, start_workers=True) as service,
        tqdm(unit="chunk", leave=False, disable=not sys.stderr.isatty()) as chunk_bar,
    ):
        job = service.replace_document(TENANT, args.doc_id, item, metadata=metadata, if_match=None)
        if job.duplicate_document_ids:
            print(f"{args.doc_id}: unchanged (the same content)")
            return 0
        job = follow(service, job, chunk_bar)
        if job.status != "succeeded":
            reason = job.error.detail if job.error else f"the job is {job.status}"
            print(f"ragapi: {args.doc_id} was not replaced: {reason}", file=sys.stderr)
            return 1
        document = service.get_document(TENANT, args.doc_id)
    print(f"{args.doc_id}: version {document.version}, {document.chunk_count} chunks")
    return 0


def reindex_document(settings: Settings, args: argparse.Namespace) -> int:
    """The stored text cut and embedded again (current settings), followed until swapped in."""
    from tqdm import tqdm

    with (
        open_service(settings, start_workers=True) as service,
        tqdm(unit="chunk", leave=False, disable=not sys.stderr.isatty()) as chunk_bar,
    ):
        job = service.reindex_document(TENANT, args.doc_id, if_match=None)
        job = follow(service, job, chunk_bar)
        if job.status != "succeeded":
            reason = job.error.detail if job.error else f"the job is {job.status}"
            print(f"ragapi: {args.doc_id} was not re-indexed: {reason}", file=sys.stderr)
            return 1
        document = service.get_document(TENANT, args.doc_id)
    print(f"{args.doc_id}: version {document.version}, {document.chunk_count} chunks")
    return 0


def reindex(args: argparse.Namespace) -> int:
    """Each tenant's index rebuilt (one, or with --all-tenants every one that holds documents):
    moved to the configured embedding model when its vectors are another's (in this process,
    followed to the switch), else every document re-indexed from its stored original by one
    job, followed to its end. Exits 1 when a document could not be re-indexed."""
    settings = load_settings()
    if not holds_data(settings):
        print("no documents")
        return 0
    failed = 0
    with open_service(settings, start_workers=True) as service:
        tenants = service.tenants() if args.all_tenants else [args.tenant]
        for tenant in tenants:
            failed += reindex_tenant(service, tenant)
    return 1 if failed else 0


def reindex_tenant(service: RagService, tenant: str) -> int:
    """One tenant's re-index, told in a line; 1 when a document failed, else 0."""
    from tqdm import tqdm

    from impl.rag.spaces import Move

    with tqdm(unit="chunk", leave=False, disable=not sys.stderr.isatty()) as chunk_bar:

        def progress(move: Move) -> None:
            chunk_bar.set_description_str(f"{tenant}: moving")
            chunk_bar.total = move.chunks_total
            chunk_bar.update(move.chunks_done - chunk_bar.n)

        moved = service.move_tenant(tenant, progress)
        if moved is not None:
            print(
                f"{tenant}: moved to {moved.target.describe()}; run `ragapi reindex` again to "
                "cut the documents again under new chunk settings too"
            )
            return 0
        index = service.reindex_tenant(tenant)
        assert index.job is not None  # no move was due
        job = follow(service, index.job, chunk_bar, tenant)
    if job.status != "succeeded":
        reason = job.error.detail if job.error else f"the job is {job.status}"
        print(f"ragapi: {tenant}: {reason}", file=sys.stderr)
        return 1
    print(f"{tenant}: {len(job.document_ids)} documents re-indexed ({job.chunks_done} chunks)")
    return 0


def patch_document(settings: Settings, args: argparse.Namespace) -> int:
    """A JSON Merge Patch of the title and metadata: --metadata '{"team": "x", "old": null}'."""
    from impl.rag.types import DocumentPatch

    changes = json.loads(args.metadata) if args.metadata is not None else {}
    if changes is not None and not isinstance(changes, dict):
        raise InvalidInput("--metadata must be a JSON object, or null to remove every key")
    patch = DocumentPatch(title=args.title, metadata=changes or {}, clear_metadata=changes is None)
    with open_service(settings, start_workers=False) as service:
        document = service.patch_document(TENANT, args.doc_id, patch, if_match=None)
    print(json.dumps(vars(document), default=str, indent=2))
    return 0


def jobs(args: argparse.Namespace) -> int:
    settings = load_settings()
    if not holds_data(settings):
        if args.action == "list":
            print("no jobs")
            return 0
        raise NotFound(f"job {args.job_id} not found")
    if args.action == "cancel":
        with open_service(settings, start_workers=False) as service:
            job = service.cancel_job(TENANT, args.job_id)
        print(f"{job.id}: {'cancelled' if job.status == 'cancelled' else 'stopping'}")
        return 0
    if args.action == "watch":
        return watch_job(settings, args.job_id)
    with open_registry(settings) as registry:
        cursor, listed = None, 0
        while True:
            page = registry.list_jobs(TENANT, limit=100, cursor=cursor, status=args.status)
            for j in page.items:
                progress = f"{j.chunks_done}/{j.chunks_total}"
                print(f"{j.id}  {j.status:<9}  {progress:>11} chunks  {' '.join(j.document_ids)}")
            listed += len(page.items)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    if not listed:
        print("no jobs")
    return 0


# `jobs watch` exits with the job's outcome.
WATCH_EXIT_STATUS = {"succeeded": 0, "failed": 1, "cancelled": 3}


def watch_job(settings: Settings, job_id: str) -> int:
    """Print the job's events as they are written to the registry's event log, by whichever
    process runs the job, until its last; the exit status is its outcome."""
    from impl.rag.service import EVENT_PAGE_SIZE

    with open_registry(settings) as registry:
        after, status = 0, "failed"
        while True:
            batch = registry.job_events(TENANT, job_id, after=after, limit=EVENT_PAGE_SIZE)
            if batch is None:
                raise NotFound(f"job {job_id} not found")
            for event in batch.events:
                line = f"{event.created_at:%H:%M:%S}  {event.type:<15}  {describe(event)}"
                print(line.rstrip(), flush=True)
                after = event.id or after
                status = event.data.get("status", status)
            if batch.finished:
                return WATCH_EXIT_STATUS[status]
            if len(batch.events) < EVENT_PAGE_SIZE:
                time.sleep(settings.events_poll_seconds)


def describe(event: Event) -> str:
    """One line of what an event reports."""
    data = event.data
    if event.type == "job.running":
        return f"attempt {data['attempt']}"
    if event.type == "job.progress":
        return f"{data['chunks_done']}/{data['chunks_total']} chunks"
    if event.type == "document.ready":
        return f"{event.document_id} version {data['version']}, {data['chunk_count']} chunks"
    if event.type == "document.failed":
        return f"{event.document_id}: {data['reason']}"
    if event.type == "job.finished":
        error = data.get("error")
        return f"{data['status']}: {error['detail']}" if error else str(data["status"])
    return event.document_id or ""


def keys(args: argparse.Namespace) -> int:
    from impl.security.keys import SqlKeyStore

    settings = load_settings()
    if args.action == "list" and not holds_data(settings):
        print("no keys")
        return 0
    store = SqlKeyStore(settings)
    try:
        if args.action == "create":
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
            created = store.create(args.tenant, args.name, scopes)
            print(f"{created.key.id}  tenant={created.key.tenant}  scopes={','.join(scopes)}")
            print(f"X-API-Key: {created.secret}")
        elif args.action == "list":
            cursor, listed = None, 0
            while True:
                page, cursor = store.list(args.tenant, limit=100, cursor=cursor)
                for k in page:
                    state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
                    print(f"{k.id}  {k.prefix}  {','.join(k.scopes):<16} {state:<18} {k.name}")
                listed += len(page)
                if cursor is None:
                    break
            if not listed:
                print("no keys")
        else:
            store.revoke(args.tenant, args.key_id)
            print(f"revoked {args.key_id}")
    finally:
        store.close()
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="ragapi",
        description="The ragapi server, and the RAG services in-process (no server needed).",
    )
    commands = root.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="start the HTTP server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--log-level", dest="log_level")
    p.set_defaults(run=serve)

    p = commands.add_parser("worker", help="claim and run ingestion jobs (no HTTP API)")
    p.set_defaults(run=worker)

    p = commands.add_parser("db", help="the registry's schema")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("upgrade", help="apply the migrations the registry lacks")
    p.set_defaults(run=db)

    p = commands.add_parser("originals", help="the stored originals")
    actions = p.add_subparsers(dest="action", required=True)
    sweep = actions.add_parser("sweep", help="remove the files no document references")
    sweep.add_argument(
        "--min-age-seconds",
        type=float,
        default=3600.0,
        help="leave younger files (uploads about to be registered) alone; default 3600",
    )
    p.set_defaults(run=originals)

    p = commands.add_parser("ingest", help="ingest files and folders (recursively)")
    p.add_argument("paths", nargs="+")
    p.add_argument("--title", help="title for every file (default: from each file)")
    p.add_argument("--metadata", help="JSON object kept with every document")
    p.set_defaults(run=ingest)

    p = commands.add_parser("query", help="answer a question with citations")
    p.add_argument("question")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default="hybrid")
    p.set_defaults(run=query)

    p = commands.add_parser("search", help="list the passages that best match a query")
    p.add_argument("query")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default="hybrid")
    p.set_defaults(run=search)

    p = commands.add_parser(
        "eval", help="measure retrieval and answers on a labelled question set (JSON lines)"
    )
    p.add_argument("questions", help="the question file, e.g. eval/questions.jsonl")
    p.add_argument("--docs", help="ingest this folder into a temporary store and evaluate it")
    p.add_argument("--url", help="evaluate a running server (its base URL) instead")
    p.add_argument("--api-key", help="the server's key (read scope); default $RAGAPI_API_KEY")
    p.add_argument("--modes", type=retrieval_modes, default="dense,lexical,hybrid")
    p.add_argument("--top-k", type=int, default=10, choices=range(1, 51), metavar="1..50")
    from impl.rag.types import RetrievalOptions

    defaults = RetrievalOptions()
    p.add_argument(
        "--weights",
        type=fusion_weights,
        default=(defaults.dense_weight, defaults.lexical_weight),
        help=f"hybrid fusion weights DENSE,LEXICAL (default "
        f"{defaults.dense_weight:g},{defaults.lexical_weight:g})",
    )
    p.add_argument("--rrf-k", type=int, default=defaults.rrf_k)
    p.add_argument("--candidates", type=int, default=defaults.candidates)
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(run=evaluate)

    p = commands.add_parser(
        "documents", help="list, show, replace, re-index, patch or delete documents"
    )
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list")
    actions.add_parser("show").add_argument("doc_id")
    actions.add_parser("delete").add_argument("doc_id")
    replace = actions.add_parser("replace", help="a new version from a file, under the same id")
    replace.add_argument("doc_id")
    replace.add_argument("path")
    replace.add_argument("--title", help="a new title (default: keep the current one)")
    replace.add_argument("--metadata", help="new metadata as a JSON object (default: keep)")
    actions.add_parser(
        "reindex", help="cut and embed the stored text again (current settings)"
    ).add_argument("doc_id")
    patch = actions.add_parser("patch", help="change the title or metadata (no re-embedding)")
    patch.add_argument("doc_id")
    patch.add_argument("--title")
    patch.add_argument(
        "--metadata", help='a JSON merge patch: {"key": "value", "gone": null}; null clears all'
    )
    p.set_defaults(run=documents)

    p = commands.add_parser(
        "reindex",
        help="rebuild a tenant's index: move it to the configured embedding model, or "
        "re-index every document from its stored original",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tenant", default=TENANT)
    which.add_argument(
        "--all-tenants", action="store_true", help="every tenant that holds documents"
    )
    p.set_defaults(run=reindex)

    p = commands.add_parser("jobs", help="list, cancel or watch ingestion jobs")
    actions = p.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list")
    listing.add_argument(
        "--status", choices=["queued", "running", "succeeded", "failed", "cancelled"]
    )
    actions.add_parser("cancel").add_argument("job_id")
    actions.add_parser(
        "watch",
        help="print a job's events as they happen; exit 0 when it succeeds, 1 when it fails, "
        "3 when it is cancelled",
    ).add_argument("job_id")
    p.set_defaults(run=jobs)

    p = commands.add_parser("keys", help="create, list or revoke API keys")
    actions = p.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", default="read", help="comma-separated: read,write,admin")
    actions.add_parser("list")
    actions.add_parser("revoke").add_argument("key_id")
    for action in actions.choices.values():
        action.add_argument("--tenant", default=TENANT)
    p.set_defaults(run=keys)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        result: int = args.run(args)
    except RagapiError as exc:
        print(f"ragapi: {exc.detail}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    raise SystemExit(main())
