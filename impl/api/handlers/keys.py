"""Handlers of the keys tag: a tenant's admin manages its tenant's keys."""

from __future__ import annotations

from typing import Annotated

from pydantic import MISSING
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from generated import models
from impl.api.deps import Keys, Limiter, Tenant
from impl.api.handlers.documents import given
from impl.api.inputs import BODY, PARAMS, validation_failed
from impl.api.responses import reply
from impl.errors import FieldError, InvalidInput


async def list_api_keys(
    params: Annotated[models.ListApiKeysParams, PARAMS], keys: Keys, tenant: Tenant
) -> Response:
    items, next_cursor = await run_in_threadpool(
        lambda: keys.list(tenant, limit=params.limit, cursor=given(params.cursor))
    )
    page = models.ApiKeyPage(
        items=[models.ApiKey.model_validate(vars(k)) for k in items], next_cursor=next_cursor
    )
    return reply(page)


async def create_api_key(
    body: Annotated[models.ApiKeyCreate, BODY], keys: Keys, limiter: Limiter, tenant: Tenant
) -> Response:
    scopes = [scope.root for scope in body.scopes]
    if len(set(scopes)) != len(scopes):  # uniqueItems, which the generated list does not check
        raise InvalidInput(
            "1 field failed validation.", [FieldError("body/scopes", "Name each scope once.")]
        )
    # Budgets the client left out are MISSING and so absent from the dump.
    overrides = {} if body.rate_limits is MISSING else body.rate_limits.model_dump()
    refused = limiter.refused_overrides(overrides)
    if refused:
        raise validation_failed(
            [FieldError(f"body/rate_limits/{budget}", why) for budget, why in refused.items()]
        )
    created = await run_in_threadpool(keys.create, tenant, body.name, scopes, overrides)
    answer = models.ApiKeyCreated.model_validate({**vars(created.key), "key": created.secret})
    return reply(answer, 201, headers={"Location": f"/api/v1/keys/{created.key.id}"})


async def revoke_api_key(
    params: Annotated[models.RevokeApiKeyParams, PARAMS], keys: Keys, tenant: Tenant
) -> Response:
    await run_in_threadpool(keys.revoke, tenant, params.key_id.root)
    return Response(status_code=204)
