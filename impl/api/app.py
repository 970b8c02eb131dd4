"""The app factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import TypedDict

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from generated.operations import OPERATIONS
from impl.api import problems, websocket
from impl.api.docs import mount_docs
from impl.api.handlers import HANDLERS, convert
from impl.api.middleware import RATE_LIMIT_HEADERS, RequestContext
from impl.api.readiness import Readiness
from impl.api.routing import Handler, add_routes
from impl.errors import RagapiError
from impl.observability.logs import configure_logging
from impl.observability.metrics import Metrics
from impl.rag.chat import ChatCompletions
from impl.rag.conversations import Conversations
from impl.rag.events import Event
from impl.rag.rewriting import QuestionRewriting
from impl.rag.service import RagService
from impl.rag.webhooks import Webhooks
from impl.security.keys import KeyStore, SqlKeyStore
from impl.security.limits import RateLimiter
from impl.security.oidc import OidcVerifier
from impl.settings import Settings

log = logging.getLogger("ragapi.app")


class State(TypedDict):
    settings: Settings
    service: RagService
    metrics: Metrics
    keys: KeyStore
    tokens: OidcVerifier | None  # None: no identity provider configured (keys only)
    limiter: RateLimiter
    readiness: Readiness
    conversations: Conversations
    chat: ChatCompletions
    webhooks: Webhooks


def render_event(event: Event) -> bytes:
    """A webhook delivery's body: the event as the event streams send it."""
    return convert.job_event(event).model_dump_json().encode()


def create_app(
    settings: Settings | None = None, handlers: Mapping[str, Handler] = HANDLERS
) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    metrics = Metrics()
    tokens = OidcVerifier(settings) if settings.oidc_issuer else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[State]:
        if not settings.auth_enabled:
            log.warning(
                "AUTHENTICATION IS OFF (RAGAPI_AUTH_ENABLED=false): anyone who can reach this "
                "server can read, change and delete every document of the default tenant"
            )
        keys = await run_in_threadpool(SqlKeyStore, settings)
        service = await run_in_threadpool(RagService, settings, None, metrics)
        metrics.store_counts = service.store_counts
        await run_in_threadpool(service.start)
        service.start_parsers()
        limiter = RateLimiter(settings)
        rewriting = await run_in_threadpool(QuestionRewriting, settings)
        conversations = Conversations(settings, service, rewriting)
        # Webhooks are sent by the server processes, not by `ragapi worker`: every deployment
        # runs a server (the embedded default runs no worker), and the delivery loop claims
        # each webhook with a lease, so several servers share the work.
        webhooks = await run_in_threadpool(Webhooks, settings, render_event)
        webhooks.start()
        try:
            yield {
                "settings": settings,
                "service": service,
                "metrics": metrics,
                "keys": keys,
                "tokens": tokens,
                "limiter": limiter,
                "readiness": Readiness({**service.probes(), **limiter.probes()}),
                "conversations": conversations,
                "chat": ChatCompletions(service, rewriting),
                "webhooks": webhooks,
            }
        finally:
            await run_in_threadpool(webhooks.close)
            conversations.close()
            await run_in_threadpool(service.close)
            keys.close()

    # FastAPI's own schema, docs and trailing-slash redirects are off: the contract file is
    # served as written, and paths match it exactly.
    app = FastAPI(
        lifespan=lifespan,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    add_routes(app, handlers)
    # Not an operation of the contract (OpenAPI cannot describe a WebSocket; the ingestion
    # tag's description does): it authenticates by itself.
    app.add_api_websocket_route(websocket.PATH, websocket.serve_events)
    mount_docs(app, tokens)
    app.add_exception_handler(RagapiError, problems.handle_ragapi_error)
    app.add_exception_handler(HTTPException, problems.handle_http_exception)
    # Inputs are parsed by impl.api.inputs, so this only fires if a handler grows a parameter
    # FastAPI validates itself; it still must never leak FastAPI's 422 body.
    app.add_exception_handler(RequestValidationError, problems.handle_request_validation)
    if settings.cors_allow_origins:
        # Starlette's CORSMiddleware is pure ASGI; with no origins configured it is left out,
        # so no browser origin may call the API.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            allow_methods=sorted({op.method for op in OPERATIONS.values()}),
            allow_headers=["X-API-Key", "Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Location", "Retry-After", *RATE_LIMIT_HEADERS],
            max_age=600,
        )
    app.add_middleware(
        RequestContext,
        metrics=metrics,
        max_body_bytes=settings.max_upload_bytes,
        body_timeout_seconds=settings.body_timeout_seconds,
    )
    return app


def app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory` and for several worker processes."""
    return create_app(Settings())
