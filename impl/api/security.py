"""Authentication, scopes and rate limits, applied to every route from the operation's
declared scope and budget (x-ragapi-scope, x-ragapi-rate-limit in the contract)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from impl.api.inputs import operation_of
from impl.errors import Forbidden, InsufficientScope, RateLimited, Unauthenticated
from impl.security.keys import KeyStore
from impl.security.limits import RateLimiter
from impl.security.oidc import OidcVerifier, looks_like_jwt
from impl.settings import Settings

DEFAULT_TENANT = "default"
# The security scheme of operations that also take the key as `Authorization: Bearer <key>`
# (the openai tag: what the OpenAI SDKs send).
BEARER_API_KEY = "BearerApiKey"


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: key_id names the API key, or the token's subject
    (subject_id); None when auth is switched off."""

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
    tokens: OidcVerifier | None = request.state.tokens
    token = bearer_token(request)
    if tokens is not None and looks_like_jwt(token):
        identity = await run_in_threadpool(tokens.verify, token)
        if scope not in identity.scopes:
            granted = ", ".join(identity.scopes) or "none"
            raise InsufficientScope(
                f"This operation needs the {scope} scope; this token has {granted}.", scope
            )
        return Principal(subject_id(identity.subject), identity.tenant, {})
    # Where the operation takes a bearer key, an Authorization header is the credential
    # presented: a client that sends a wrong or malformed one is refused, whatever else it
    # sends. Whitespace around a field value is not part of it (RFC 9110, 5.5); the HTTP parser
    # drops the leading side only, so both sides are dropped here.
    bearer = takes_bearer or tokens is not None
    if takes_bearer and "authorization" in request.headers:
        presented = token
        if not presented:
            raise Unauthenticated("Send the API key as Authorization: Bearer <key>.", bearer=bearer)
    else:
        presented = request.headers.get("x-api-key", "").strip(" \t")
    if not presented:
        where = "as Authorization: Bearer <key> or " if takes_bearer else ""
        token_too = " or an access token as Authorization: Bearer <token>" if tokens else ""
        raise Unauthenticated(
            f"Send an API key {where}in the X-API-Key header{token_too}.", bearer=bearer
        )
    return await verify_key(request.state.keys, presented, scope, bearer=bearer)


async def verify_key(
    keys: KeyStore, presented: str, scope: str, *, bearer: bool = False
) -> Principal:
    """The principal of a presented key that holds ``scope``; Unauthenticated (with a Bearer
    challenge when ``bearer``) or Forbidden otherwise."""
    key = keys.recall(presented) or await run_in_threadpool(keys.verify, presented)
    if key is None:
        raise Unauthenticated("The API key is not valid or has been revoked.", bearer=bearer)
    if scope not in key.scopes:
        raise Forbidden(
            f"This operation needs the {scope} scope; this key has {', '.join(key.scopes)}."
        )
    return Principal(key.id, key.tenant, key.rate_limits)


def subject_id(subject: str) -> str:
    """What a token's subject is called where a key's id would be (the access log, rate-limit
    counters, the owner of conversations): sub:<sub>, or its digest where it is too long for
    the registry's 64 characters. A key's id (key_...) is never one of these."""
    named = f"sub:{subject}"
    if len(named) <= 64:
        return named
    return f"sub:sha256:{hashlib.sha256(subject.encode()).hexdigest()[:53]}"
