"""The `ragapi` command: the server, and the RAG services in-process (no server needed)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from impl.errors import ConfigurationError, RagapiError
from impl.rag.types import RetrievalOptions
from impl.settings import Settings

TENANT = "default"


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from impl.api.app import create_app

    # Flags override the environment; they go through it so that worker processes, which
    # build their own app, see them too.
    for flag in ("host", "port", "workers", "log_level"):
        value = getattr(args, flag)
        if value is not None:
            os.environ[f"RAGAPI_{flag.upper()}"] = str(value)
    settings = Settings()
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
    }
    if settings.workers == 1:
        uvicorn.run(app, **common)  # type: ignore[arg-type]
    else:
        # Before any worker starts: each one's metrics then go to files all of them read.
        metrics_dir = settings.data_dir.resolve() / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        uvicorn.run(
            "impl.api.app:app_from_environment",
            factory=True,
            workers=settings.workers,
            **common,  # type: ignore[arg-type]
        )
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

    database = open_database(Settings().resolved_registry_url)
    try:
        database.upgrade()
        print(f"registry schema at {database.revision()}")
    finally:
        database.close()
    return 0


def bootstrap_admin_key(settings: Settings) -> None:
    """On a first start there are no keys, so nobody could use the server: make an admin key
    and show it once. Done here, before the workers start, so several workers make one key."""
    from impl.security.keys import SCOPES, KeyStore

    keys = KeyStore(settings)
    try:
        if keys.count() == 0:
            created = keys.create(TENANT, "bootstrap admin", list(SCOPES))
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
def open_service(start_workers: bool) -> Iterator[Any]:
    from impl.rag.service import RagService

    service = RagService(Settings())
    if start_workers:
        service.start()
    try:
        yield service
    finally:
        service.close()


def files_under(paths: Sequence[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def ingest(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from impl.rag.types import IngestItem

    metadata = json.loads(args.metadata) if args.metadata else {}
    files = list(files_under(args.paths))
    failures = 0
    with open_service(start_workers=True) as service:
        for path in tqdm(files, unit="file", disable=not sys.stderr.isatty()):
            item = IngestItem(path.read_bytes(), path.name, args.title, metadata)
            try:
                job = service.submit_ingest(TENANT, [item])
                job = service.wait_for_job(TENANT, job.id, timeout_s=3600)
            except RagapiError as exc:
                failures += 1
                print(f"{path}: {exc.detail}", file=sys.stderr)
                continue
            duplicate = " (duplicate)" if job.duplicate_document_ids else ""
            reason = f": {job.error.detail}" if job.error else ""
            print(f"{path}: {job.status} {' '.join(job.document_ids)}{duplicate}{reason}")
            failures += job.status == "failed"
    return 1 if failures else 0


def query(args: argparse.Namespace) -> int:
    with open_service(start_workers=False) as service:
        answer = service.answer(
            TENANT, args.question, top_k=args.top_k, retrieval=RetrievalOptions(mode=args.mode)
        )
    print(answer.answer)
    for citation in answer.citations:
        page = f", page {citation.page}" if citation.page else ""
        print(f"[{citation.marker}] {citation.document_title}{page}: {citation.quote}")
    return 0


def search(args: argparse.Namespace) -> int:
    with open_service(start_workers=False) as service:
        hits = service.search(
            TENANT, args.query, top_k=args.top_k, retrieval=RetrievalOptions(mode=args.mode)
        )
    for hit in hits:
        signals = " ".join(
            f"{name} #{found.rank} {found.score:.3f}" for name, found in hit.explain.items()
        )
        print(f"{hit.score:.4f} ({signals})  {hit.document_title} #{hit.chunk.index}:")
        print(f"    {hit.chunk.text[:200]}")
    return 0


def documents(args: argparse.Namespace) -> int:
    with open_service(start_workers=False) as service:
        if args.action == "list":
            cursor = None
            while True:
                page = service.list_documents(TENANT, limit=100, cursor=cursor)
                for d in page.items:
                    print(f"{d.id}  {d.status:<7}  {d.chunk_count:>5} chunks  {d.title}")
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        elif args.action == "show":
            d = service.get_document(TENANT, args.doc_id)
            print(json.dumps(vars(d), default=str, indent=2))
        else:
            service.delete_document(TENANT, args.doc_id)
            print(f"deleted {args.doc_id}")
    return 0


def keys(args: argparse.Namespace) -> int:
    from impl.security.keys import KeyStore

    store = KeyStore(Settings())
    try:
        if args.action == "create":
            scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
            created = store.create(args.tenant, args.name, scopes)
            print(f"{created.key.id}  tenant={created.key.tenant}  scopes={','.join(scopes)}")
            print(f"X-API-Key: {created.secret}")
        elif args.action == "list":
            cursor = None
            while True:
                page, cursor = store.list(args.tenant, limit=100, cursor=cursor)
                for k in page:
                    state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
                    print(f"{k.id}  {k.prefix}  {','.join(k.scopes):<16} {state:<18} {k.name}")
                if cursor is None:
                    break
        else:
            store.revoke(args.tenant, args.key_id)
            print(f"revoked {args.key_id}")
    finally:
        store.close()
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="ragapi", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="start the HTTP server")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--log-level", dest="log_level")
    p.set_defaults(run=serve)

    p = commands.add_parser("db", help="the registry's schema")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("upgrade", help="apply the migrations the registry lacks")
    p.set_defaults(run=db)

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

    p = commands.add_parser("documents", help="list, show or delete documents")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("list")
    actions.add_parser("show").add_argument("doc_id")
    actions.add_parser("delete").add_argument("doc_id")
    p.set_defaults(run=documents)

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
