"""Bearer JWTs from an OpenID Connect provider: access tokens its token endpoint issues (to a
machine client by the client-credentials grant, or to a person through a front end), verified
with the provider's published keys and mapped to a tenant and ragapi's scopes by settings.

The provider is found by discovery (``{issuer}/.well-known/openid-configuration``), its keys
read from the ``jwks_uri`` there and kept. A token naming a key not in hand makes the keys be
fetched again (the provider rotated them), but never more often than
``oidc_jwks_min_refresh_seconds``: forged tokens with made-up key ids cannot turn this server
into a flood against the provider. Nothing of a token's content is ever logged.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, cast

import jwt

from impl.dependencies import Dependency
from impl.errors import DependencyUnavailable, InvalidToken
from impl.security.keys import SCOPES, Scope
from impl.settings import PUBLIC_KEY_ALGORITHMS, Settings

log = logging.getLogger(__name__)

# Three base64url segments, the second one a JSON object ("eyJ" is `{"` encoded): what tells a
# JWT from an API key (rk_...) in an Authorization header.
JWT_SHAPE = re.compile(r"^eyJ[A-Za-z0-9_-]*\.eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*$")
MAX_DOCUMENT_BYTES = 1 << 20  # a discovery document or key set is a few kilobytes
MAX_TENANT_LENGTH = 64  # the registry's tenant columns
KNOWN_ALGORITHMS = ("none", "HS256", "HS384", "HS512", *PUBLIC_KEY_ALGORITHMS)


def looks_like_jwt(token: str) -> bool:
    return JWT_SHAPE.match(token) is not None


@dataclass(frozen=True)
class TokenIdentity:
    """Who a verified token speaks for."""

    subject: str  # the token's sub: the client id of a machine client, a person's id
    tenant: str
    scopes: list[Scope]


@dataclass
class KeySet:
    """The provider's keys as last fetched, by kid (a JWK without kid cannot be chosen)."""

    jwks: dict[str, dict[str, Any]]
    fetched_at: float
    # PyJWK objects by (kid, alg), made once: a key without "alg" serves every algorithm of
    # its type.
    parsed: dict[tuple[str, str], jwt.PyJWK] = field(default_factory=dict)


def claim(claims: dict[str, Any], path: str) -> Any:
    """The claim of that name (Auth0's namespaced https://example.com/tenant), else the one at
    a dotted path (realm_access.roles); None where there is none."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for name in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def identity(claims: dict[str, Any], settings: Settings) -> TokenIdentity:
    """Who a verified token's claims speak for, by the oidc_* claim settings."""
    tenant = claim(claims, settings.oidc_tenant_claim) or settings.oidc_default_tenant
    if not isinstance(tenant, str) or not 0 < len(tenant) <= MAX_TENANT_LENGTH:
        raise InvalidToken(
            f"The token names no tenant: its {settings.oidc_tenant_claim} claim must be "
            f"a string of 1 to {MAX_TENANT_LENGTH} characters."
        )
    values = claim(claims, settings.oidc_scopes_claim)
    if isinstance(values, str):
        values = values.split()
    if not isinstance(values, list):
        values = []
    mapping = settings.oidc_scope_map or {s: s for s in SCOPES}
    granted = {mapping[v] for v in values if isinstance(v, str) and v in mapping}
    return TokenIdentity(str(claims["sub"]), tenant, [s for s in SCOPES if s in granted])


class OidcVerifier:
    """Verifies bearer JWTs of one issuer. Safe to share between threads; verify blocks (it
    may ask the provider), so async callers run it in a worker thread."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._issuer = settings.oidc_issuer
        self._discovery_url = f"{settings.oidc_issuer.rstrip('/')}/.well-known/openid-configuration"
        self._provider = Dependency("identity provider", f"identity provider {self._issuer}")
        self._discovery: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._last_failure: tuple[float, DependencyUnavailable] | None = None
        self._fetch_lock = threading.Lock()

    def token_endpoint(self) -> str | None:
        """The provider's token endpoint, from its discovery document; None while it cannot
        be read."""
        try:
            with self._fetch_lock:
                endpoint = self._discovered().get("token_endpoint")
        except DependencyUnavailable:
            return None
        return endpoint if isinstance(endpoint, str) else None

    def verify(self, token: str) -> TokenIdentity:
        """The identity of a valid token; InvalidToken (401) for any other, and
        DependencyUnavailable (503) when the provider's keys are needed and cannot be read."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise InvalidToken("The bearer token is not a well-formed JWT.") from None
        alg = header.get("alg")
        accepted = self._settings.oidc_algorithms  # never none nor HS* (settings refuse them)
        if alg not in accepted:
            # Only a name ragapi knows is repeated back, never whatever a header holds.
            named = f"the {alg!r} algorithm" if alg in KNOWN_ALGORITHMS else "this algorithm"
            raise InvalidToken(
                f"Tokens signed with {named} are not accepted; accepted: {', '.join(accepted)}."
            )
        # Checked before any key is looked up, so another issuer's tokens cost no fetch.
        if unverified.get("iss") != self._issuer:
            raise InvalidToken("The token was issued by another issuer than this API trusts.")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise InvalidToken("The token does not name its signing key (kid).")
        key = self._signing_key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._settings.oidc_audience,
                issuer=self._issuer,
                leeway=self._settings.oidc_leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("The token is not valid yet (nbf).") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("The token is not meant for this API (aud).") from None
        except jwt.MissingRequiredClaimError as missing:
            raise InvalidToken(f"The token lacks the {missing.claim} claim.") from None
        except jwt.PyJWTError:
            raise InvalidToken("The token's signature does not verify.") from None
        return identity(claims, self._settings)

    def _signing_key(self, kid: str, alg: str) -> jwt.PyJWK:
        keys = self._keys
        if keys is None or kid not in keys.jwks or self._stale(keys):
            keys = self._refreshed_keys(kid)
        jwk = keys.jwks.get(kid)
        if jwk is None:
            raise InvalidToken("The token's signing key is not one of the provider's keys.")
        stated = jwk.get("alg")
        if stated is not None and stated != alg:
            raise InvalidToken("The token's algorithm is not its signing key's.")
        parsed = keys.parsed.get((kid, alg))
        if parsed is None:
            try:
                parsed = jwt.PyJWK(jwk, algorithm=alg)
            except jwt.PyJWTError:
                raise InvalidToken("The token's algorithm does not suit its signing key.") from None
            keys.parsed[(kid, alg)] = parsed
        return parsed

    def _stale(self, keys: KeySet) -> bool:
        return time.monotonic() - keys.fetched_at > self._settings.oidc_jwks_cache_seconds

    def _refreshed_keys(self, kid: str) -> KeySet:
        """The keys, fetched again unless another thread just did, or the last fetch (or
        failure) is more recent than the minimum interval."""
        with self._fetch_lock:
            keys = self._keys
            if keys is not None and kid in keys.jwks and not self._stale(keys):
                return keys  # fetched by another thread meanwhile
            now = time.monotonic()
            interval = self._settings.oidc_jwks_min_refresh_seconds
            if keys is not None and now - keys.fetched_at < interval:
                return keys
            if self._last_failure is not None and now - self._last_failure[0] < interval:
                if keys is not None:
                    return keys
                raise self._last_failure[1]
            try:
                jwks = self._fetch(self._jwks_uri())
                self._keys = KeySet(usable_keys(jwks), time.monotonic())
                self._last_failure = None
            except DependencyUnavailable as down:
                self._last_failure = (now, down)
                if keys is not None:
                    return keys  # the keys in hand keep working while the provider is down
                raise
            return self._keys

    def _jwks_uri(self) -> str:
        uri = self._discovered().get("jwks_uri")
        if not isinstance(uri, str):
            raise self._provider.failed(ValueError("its discovery document names no jwks_uri"))
        return uri

    def _discovered(self) -> dict[str, Any]:
        if self._discovery is None:
            document = self._fetch(self._discovery_url)
            # OpenID Connect Discovery 1.0, 4.3: the document must be the issuer's own.
            if document.get("issuer") != self._issuer:
                named = document.get("issuer")
                raise self._provider.failed(
                    ValueError(f"its discovery document names the issuer {named!r}")
                )
            self._discovery = document
        return self._discovery

    def _fetch(self, url: str) -> dict[str, Any]:
        try:
            # The jwks_uri comes from the provider's document: never a file: or other scheme.
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"{url} is not an http(s) URL")
            request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
            timeout = self._settings.oidc_http_timeout_seconds
            with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
                document = json.loads(response.read(MAX_DOCUMENT_BYTES))
            if not isinstance(document, dict):
                raise ValueError(f"{url} answered JSON that is not an object")
        except (OSError, ValueError) as exc:
            raise self._provider.failed(exc) from None
        self._provider.answered()
        return cast(dict[str, Any], document)


def usable_keys(jwks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The signing keys of a JWK set by kid (keys for encryption and keys without a kid are
    left out)."""
    found = jwks.get("keys")
    if not isinstance(found, list):
        return {}
    return {
        k["kid"]: k
        for k in found
        if isinstance(k, dict) and isinstance(k.get("kid"), str) and k.get("use", "sig") == "sig"
    }
