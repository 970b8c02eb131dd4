"""Typed dependencies: the resources the lifespan made, read from the request's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import Request

from impl.observability.metrics import Metrics
from impl.rag.service import RagService
from impl.settings import Settings


def get_service(request: Request) -> RagService:
    service: RagService = request.state.service
    return service


def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.state.metrics
    return metrics


Service = Annotated[RagService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]
AppMetrics = Annotated[Metrics, Depends(get_metrics)]


def current_tenant() -> str:
    """The tenant a request acts for. Until API keys land every request is the default
    tenant's; the services already confine everything to the tenant given here."""
    return "default"


Tenant = Annotated[str, Depends(current_tenant)]
