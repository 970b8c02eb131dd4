"""Typed dependencies: the resources the lifespan made, read from the request's state.

Each is a coroutine function although it awaits nothing: FastAPI runs a plain function
dependency in a worker thread, a thread round trip per dependency and request (a search took
two of them, besides its own)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import Request

from impl.api.readiness import Readiness
from impl.api.security import Principal
from impl.observability.metrics import Metrics
from impl.rag.chat import ChatCompletions
from impl.rag.conversations import Conversations
from impl.rag.service import RagService
from impl.rag.webhooks import Webhooks
from impl.security.keys import KeyStore
from impl.security.limits import RateLimiter
from impl.settings import Settings


async def get_service(request: Request) -> RagService:
    service: RagService = request.state.service
    return service


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.state.metrics
    return metrics


Service = Annotated[RagService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]


async def get_keys(request: Request) -> KeyStore:
    keys: KeyStore = request.state.keys
    return keys


async def get_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.state.limiter
    return limiter


async def current_tenant(request: Request) -> str:
    """The tenant of the request's key (set by impl.api.security.authorize, which runs
    before every handler of a secured operation)."""
    principal: Principal = request.state.principal
    return principal.tenant


async def current_principal(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


Tenant = Annotated[str, Depends(current_tenant)]
CurrentPrincipal = Annotated[Principal, Depends(current_principal)]
Keys = Annotated[KeyStore, Depends(get_keys)]
Limiter = Annotated[RateLimiter, Depends(get_limiter)]


async def get_readiness(request: Request) -> Readiness:
    readiness: Readiness = request.state.readiness
    return readiness


ReadinessProbes = Annotated[Readiness, Depends(get_readiness)]


async def get_conversations(request: Request) -> Conversations:
    conversations: Conversations = request.state.conversations
    return conversations


async def get_chat(request: Request) -> ChatCompletions:
    chat: ChatCompletions = request.state.chat
    return chat


ConversationStore = Annotated[Conversations, Depends(get_conversations)]
Chat = Annotated[ChatCompletions, Depends(get_chat)]


async def get_webhooks(request: Request) -> Webhooks:
    webhooks: Webhooks = request.state.webhooks
    return webhooks


WebhookStore = Annotated[Webhooks, Depends(get_webhooks)]
