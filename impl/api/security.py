"""Authentication, scopes and rate limits, applied to every route from the operation's
declared scope and budget (x-ragapi-scope, x-ragapi-rate-limit in the contract)."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from impl.api.inputs import operation_of
from impl.errors import Forbidden, RateLimited, Unauthenticated
from impl.security.keys import KeyStore
from impl.security.limits import RateLimiter
from impl.settings import Settings

DEFAULT_TENANT = "default"
# The security scheme of operations that also take the key as `Authorization: Bearer <key>`
# (the openai tag: what the OpenAI SDKs send).
BEARER_API_KEY = "BearerApiKey"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for. key_id is None when auth is switched off."""

    key_id: str | None
    tenant: str
    rate_limits: dict[str, str]


async def authorize(request: Request) -> None:
    """On the event loop: only a key not verified in the last seconds costs a registry lookup,
    and that runs in a worker thread."""
    op = operation_of(request)
    if op.scope is None:
        return
    settings: Settings = request.state.settings
    if settings.auth_enabled:
        principal = await authenticate(request, op.scope, BEARER_API_KEY in op.security)
    else:
        principal = Principal(None, DEFAULT_TENANT, {})
    state = request.scope["state"]
    state["principal"] = principal  # read by the tenant dependency and the access log
    if op.rate_limit is not None:
        limiter: RateLimiter = request.state.limiter
        client = request.client.host if request.client else "unknown"
        identity = principal.key_id or f"ip:{client}"
        decision = await limiter.hit(
            op.rate_limit, identity, principal.rate_limits.get(op.rate_limit)
        )
        state["rate_limit"] = decision  # the middleware adds its headers to the response
        if not decision.allowed:
            raise RateLimited(
                f"The {op.rate_limit} budget of {decision.limit} requests per "
                f"{decision.window_seconds} s is spent; retry in {decision.reset_seconds} s.",
                decision.reset_seconds,
            )


def bearer_token(request: Request) -> str:
    """The credentials of an `Authorization: Bearer <token>` header (scheme case-insensitive,
    RFC 9110, 11.1); empty when there is none."""
    scheme, _, token = request.headers.get("authorization", "").strip(" \t").partition(" ")
    return token.strip(" \t") if scheme.lower() == "bearer" else ""


async def authenticate(request: Request, scope: str, takes_bearer: bool = False) -> Principal:
    # Where the operation takes a bearer credential, an Authorization header is the credential
    # presented: a client that sends a wrong or malformed one is refused, whatever else it
    # sends. Whitespace around a field value is not part of it (RFC 9110, 5.5); the HTTP parser
    # drops the leading side only, so both sides are dropped here.
    if takes_bearer and "authorization" in request.headers:
        presented = bearer_token(request)
        if not presented:
            raise Unauthenticated("Send the API key as Authorization: Bearer <key>.")
    else:
        presented = request.headers.get("x-api-key", "").strip(" \t")
    if not presented:
        where = "as Authorization: Bearer <key> or " if takes_bearer else ""
        raise Unauthenticated(f"Send an API key {where}in the X-API-Key header.")
    return await verify_key(request.state.keys, presented, scope)


async def verify_key(keys: KeyStore, presented: str, scope: str) -> Principal:
    """The principal of a presented key that holds ``scope``; Unauthenticated or Forbidden
    otherwise."""
    key = keys.recall(presented) or await run_in_threadpool(keys.verify, presented)
    if key is None:
        raise Unauthenticated("The API key is not valid or has been revoked.")
    if scope not in key.scopes:
        raise Forbidden(
            f"This operation needs the {scope} scope; this key has {', '.join(key.scopes)}."
        )
    return Principal(key.id, key.tenant, key.rate_limits)
