"""Handlers of the webhooks tag: a tenant's admin registers the URLs its events are sent to."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from generated import models
from impl.api.deps import Tenant, WebhookStore
from impl.api.handlers.documents import given
from impl.api.inputs import BODY, PARAMS
from impl.api.responses import reply
from impl.errors import FieldError, InvalidInput


async def list_webhooks(
    params: Annotated[models.ListWebhooksParams, PARAMS], webhooks: WebhookStore, tenant: Tenant
) -> Response:
    items, next_cursor = await run_in_threadpool(
        lambda: webhooks.list(tenant, limit=params.limit, cursor=given(params.cursor))
    )
    page = models.WebhookPage(
        items=[models.Webhook.model_validate(asdict(w)) for w in items], next_cursor=next_cursor
    )
    return reply(page)


async def create_webhook(
    body: Annotated[models.WebhookCreate, BODY], webhooks: WebhookStore, tenant: Tenant
) -> Response:
    given_types = given(body.event_types)
    event_types = None if given_types is None else [t.root for t in given_types]
    if event_types is not None and len(set(event_types)) != len(event_types):
        # uniqueItems, which the generated list does not check
        raise InvalidInput(
            "1 field failed validation.", [FieldError("body/event_types", "Name each type once.")]
        )
    created = await run_in_threadpool(
        webhooks.create,
        tenant,
        str(body.url),
        event_types,
        given(body.description),
    )
    answer = models.WebhookCreated.model_validate(
        {**asdict(created.webhook), "secret": created.secret}
    )
    return reply(answer, 201, headers={"Location": f"/api/v1/webhooks/{created.webhook.id}"})


async def get_webhook(
    params: Annotated[models.GetWebhookParams, PARAMS], webhooks: WebhookStore, tenant: Tenant
) -> Response:
    webhook = await run_in_threadpool(webhooks.get, tenant, params.webhook_id.root)
    return reply(models.Webhook.model_validate(asdict(webhook)))


async def delete_webhook(
    params: Annotated[models.DeleteWebhookParams, PARAMS], webhooks: WebhookStore, tenant: Tenant
) -> Response:
    await run_in_threadpool(webhooks.delete, tenant, params.webhook_id.root)
    return Response(status_code=204)
