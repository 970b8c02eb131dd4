"""Sign-in with an OpenID Connect provider beside API keys, against a real provider on loopback:
oidc-provider (a certified implementation, tests/security/oidc/provider.mjs), whose machine
clients get JWT access tokens by the OAuth2 client credentials grant."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from streamlit.testing.v1 import AppTest

from impl.errors import InvalidToken
from impl.security.oidc import identity
from impl.settings import Settings
from tests.conftest import (
    ROOT,
    Server,
    create_key,
    free_port,
    launch_server,
    wait_until_ready,
)
from tests.identity_provider import (
    AUDIENCE,
    LEEWAY_SECONDS,
    MIN_REFRESH_SECONDS,
    Provider,
    oidc_provider,
    oidc_settings,
)

API = "/api/v1"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oidc")


@pytest.fixture(scope="module")
def provider(folder: Path) -> Iterator[Provider]:
    with oidc_provider(folder) as running:
        yield running


@pytest.fixture(scope="module")
def server(folder: Path, provider: Provider) -> Iterator[Server]:
    """ragapi trusting the provider."""
    running = wait_until_ready(launch_server(folder / "data", **oidc_settings(provider.issuer)))
    yield running
    running.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_invalid_token(response: httpx.Response, says: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:ragapi:problem:unauthenticated"
    assert says in response.json()["detail"]
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="ragapi", error="invalid_token"'), challenge


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parts(token: str) -> tuple[dict[str, object], dict[str, object]]:
    header, payload, _ = token.split(".")
    return (
        json.loads(base64.urlsafe_b64decode(header + "==")),
        json.loads(base64.urlsafe_b64decode(payload + "==")),
    )


def forged(header: dict[str, object], payload: dict[str, object], signature: str = "") -> str:
    head = b64url(json.dumps(header).encode())
    body = b64url(json.dumps(payload).encode())
    return f"{head}.{body}.{signature}"


def test_a_client_credentials_token_acts_for_its_tenant_with_its_scopes(
    server: Server, provider: Provider
) -> None:
    acme_key = create_key(server, "acme", "read", name="acme-key")
    token = provider.token("acme-admin", "read write admin")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        # Keys of the token's tenant: the one made for acme, not the default tenant's.
        keys = http.get(f"{API}/keys", headers=bearer(token))
        assert keys.status_code == 200, keys.text
        assert [k["name"] for k in keys.json()["items"]] == ["acme-key"]
        # A document ingested with the token belongs to acme: acme's API key finds it.
        ingested = http.post(
            f"{API}/ingest",
            params={"wait": "true"},
            json={"title": "Sign-in", "text": "Machine clients sign in with client credentials."},
            headers=bearer(token),
        )
        assert ingested.status_code in (200, 201), ingested.text
        listed = http.get(f"{API}/documents", headers={"X-API-Key": acme_key})
        assert [d["title"] for d in listed.json()["items"]] == ["Sign-in"]
        default = http.get(f"{API}/documents", headers={"X-API-Key": server.api_key})
        assert default.json()["items"] == []
        # The OpenAI-compatible operations take the token where the SDKs put a key.
        models = http.get("/v1/models", headers=bearer(token))
        assert models.status_code == 200, models.text


def test_a_token_without_the_scope_is_forbidden(server: Server, provider: Provider) -> None:
    token = provider.token("acme-reader", "read")
    with httpx.Client(base_url=server.url, timeout=60, headers=bearer(token)) as http:
        assert http.get(f"{API}/documents").status_code == 200
        refused = http.get(f"{API}/keys")
    assert refused.status_code == 403, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert "needs the admin scope; this token has read" in refused.json()["detail"]
    challenge = refused.headers["www-authenticate"]
    assert challenge == 'Bearer realm="ragapi", error="insufficient_scope", scope="admin"'


def remaining(response: httpx.Response) -> int:
    """What is left of the budget the request counted against (the RateLimit header's r)."""
    assert response.status_code == 200, response.text
    return int(response.headers["ratelimit"].split(";r=")[1].split(";")[0])


def test_a_tokens_budget_is_its_subjects_as_a_keys_is_its_own(
    server: Server, provider: Provider
) -> None:
    first, second = provider.token("acme-reader", "read"), provider.token("acme-reader", "read")
    key = create_key(server, "acme", "read", name="budget")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = remaining(http.get(f"{API}/documents", headers=bearer(first)))
        # Another token of the same client is the same subject: the same budget, one less.
        assert remaining(http.get(f"{API}/documents", headers=bearer(second))) == before - 1
        # A new key of the same tenant has a budget of its own, whole (shared, it would have
        # before - 2 left).
        with_key = remaining(http.get(f"{API}/documents", headers={"X-API-Key": key}))
        assert with_key >= before


def test_an_expired_token_is_refused(server: Server, provider: Provider) -> None:
    token = provider.token("acme-short-lived", "read")  # valid for 1 s
    _, claims = parts(token)
    assert claims["exp"] == claims["iat"] + 1  # type: ignore[operator]
    time.sleep(1 + LEEWAY_SECONDS + 1.5)
    answer = httpx.get(f"{server.url}{API}/documents", headers=bearer(token), timeout=60)
    assert_invalid_token(answer, "expired")


def test_a_token_for_another_audience_is_refused(server: Server, provider: Provider) -> None:
    token = provider.token("acme-reader", "read", resource="https://another-api.test")
    assert parts(token)[1]["aud"] == "https://another-api.test"
    answer = httpx.get(f"{server.url}{API}/documents", headers=bearer(token), timeout=60)
    assert_invalid_token(answer, "not meant for this API")


def test_a_token_from_another_issuer_is_refused(
    server: Server, provider: Provider, folder: Path
) -> None:
    with oidc_provider(folder) as another:
        token = another.token("acme-admin", "read write admin")
    fetches = provider.jwks_requests()
    answer = httpx.get(f"{server.url}{API}/documents", headers=bearer(token), timeout=60)
    assert_invalid_token(answer, "another issuer")
    assert provider.jwks_requests() == fetches  # refused before any key is looked up


def test_unsigned_and_symmetric_tokens_are_refused(server: Server, provider: Provider) -> None:
    token = provider.token("acme-admin", "read write admin")
    header, claims = parts(token)
    unsigned = forged({**header, "alg": "none"}, claims)
    answer = httpx.get(f"{server.url}{API}/documents", headers=bearer(unsigned), timeout=60)
    assert_invalid_token(answer, "the 'none' algorithm are not accepted")
    # HS256 keyed with the provider's public key, which anyone can read: the classic confusion.
    jwks = httpx.get(f"{provider.issuer}/jwks", timeout=10).json()
    secret = json.dumps(jwks["keys"][0]).encode()
    unsigned_part = forged({**header, "alg": "HS256"}, claims)
    signature = b64url(hmac.new(secret, unsigned_part.encode(), hashlib.sha256).digest())
    answer = httpx.get(
        f"{server.url}{API}/documents", headers=bearer(unsigned_part + signature), timeout=60
    )
    assert_invalid_token(answer, "the 'HS256' algorithm are not accepted")
    # A real token whose claims were changed after signing.
    tampered = token.split(".")
    tampered[1] = b64url(json.dumps({**claims, "tenant": "default"}).encode())
    answer = httpx.get(
        f"{server.url}{API}/documents", headers=bearer(".".join(tampered)), timeout=60
    )
    assert_invalid_token(answer, "signature does not verify")


def test_forged_key_ids_do_not_hammer_the_provider(server: Server, provider: Provider) -> None:
    header, claims = parts(provider.token("acme-reader", "read"))
    fetches = provider.jwks_requests()
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(30):
            token = forged({**header, "kid": uuid.uuid4().hex}, claims, "c2lnbmF0dXJl")
            assert_invalid_token(http.get(f"{API}/documents", headers=bearer(token)), "key")
    elapsed = time.monotonic() - started
    # One fetch per interval at most, where one per forged kid would be 30.
    assert provider.jwks_requests() - fetches <= elapsed / MIN_REFRESH_SECONDS + 1


def test_a_rotated_signing_key_is_fetched_and_accepted(server: Server, provider: Provider) -> None:
    before = provider.token("acme-reader", "read")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.get(f"{API}/documents", headers=bearer(before)).status_code == 200
        provider.stop()
        provider.start()  # the same issuer, with a new signing key under a new kid
        after = provider.token("acme-reader", "read")
        assert parts(after)[0]["kid"] != parts(before)[0]["kid"]
        time.sleep(MIN_REFRESH_SECONDS)  # since ragapi's last fetch of the keys
        answer = http.get(f"{API}/documents", headers=bearer(after))
        assert answer.status_code == 200, answer.text
        # The retired key is no longer the provider's: tokens it signed are refused.
        assert_invalid_token(http.get(f"{API}/documents", headers=bearer(before)), "key")


def test_api_keys_keep_working_beside_tokens(server: Server) -> None:
    with server.client() as http:
        assert http.get(f"{API}/documents").status_code == 200
        missing = httpx.get(f"{server.url}{API}/documents", timeout=60)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="ragapi", ApiKey header="X-API-Key"'


def test_the_served_contract_names_the_providers_token_endpoint(
    server: Server, provider: Provider
) -> None:
    schemes = httpx.get(f"{server.url}/openapi.json", timeout=60).json()["components"][
        "securitySchemes"
    ]
    token_url = schemes["OAuth2"]["flows"]["clientCredentials"]["tokenUrl"]
    discovery = f"{provider.issuer}/.well-known/openid-configuration"
    assert token_url == httpx.get(discovery, timeout=10).json()["token_endpoint"]
    assert provider.issuer in token_url


def test_a_provider_that_does_not_answer_is_a_503_not_a_500(
    folder: Path, provider: Provider
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    header, claims = parts(provider.token("acme-reader", "read"))
    token = forged(header, {**claims, "iss": down}, "c2lnbmF0dXJl")
    running = wait_until_ready(launch_server(folder / "down-data", **oidc_settings(down)))
    try:
        answer = httpx.get(f"{running.url}{API}/documents", headers=bearer(token), timeout=60)
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["type"] == "urn:ragapi:problem:dependency-unavailable"
        assert "identity provider" in answer.json()["detail"]
        assert int(answer.headers["retry-after"]) > 0
        # Keys do not depend on it.
        with running.client() as http:
            assert http.get(f"{API}/documents").status_code == 200
        # Nothing of the token reached the log.
        assert token.split(".")[1] not in running.log.read_text()
    finally:
        running.stop()


def test_the_ui_signs_in_with_a_token(
    server: Server, provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    title = f"ui-token-{uuid.uuid4().hex[:8]}"
    ingested = httpx.post(
        f"{server.url}{API}/ingest",
        params={"wait": "true"},
        json={"title": title, "text": "The UI takes an access token where it takes a key."},
        headers=bearer(provider.token("acme-admin", "write")),
        timeout=120,
    )
    assert ingested.status_code in (200, 201), ingested.text
    monkeypatch.syspath_prepend(str(ROOT / "ui"))  # as `streamlit run ui/app.py` does
    ui = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=60)
    ui.run()
    ui.text_input(key="api_url").set_value(server.url)
    ui.text_input(key="api_key").set_value(provider.token("acme-reader", "read"))
    ui.radio(key="page").set_value("Documents")
    ui.run()
    assert not ui.exception and not ui.error, [e.value for e in ui.error]
    shown = "\n".join(m.value for m in ui.markdown).replace("\\", "")
    assert f"**{title}**" in shown


def mapped(claims: dict[str, object], **settings: object) -> tuple[str, list[str]]:
    """The tenant and scopes a verified token with these claims gets under these settings."""
    configured = Settings(oidc_issuer="https://sso.test", oidc_audience=AUDIENCE, **settings)
    found = identity({"sub": "client-1", **claims}, configured)
    return found.tenant, list(found.scopes)


def test_claims_map_to_tenant_and_scopes_as_the_settings_say() -> None:
    # OAuth2's scope string; values that are not ragapi's scopes are ignored.
    assert mapped({"tenant": "acme", "scope": "openid read admin"}) == ("acme", ["read", "admin"])
    # Keycloak's roles in a nested list, named by a dotted path, through a map.
    keycloak = {"org": {"id": "acme"}, "realm_access": {"roles": ["ragapi-write", "offline"]}}
    assert mapped(
        keycloak,
        oidc_tenant_claim="org.id",
        oidc_scopes_claim="realm_access.roles",
        oidc_scope_map={"ragapi-write": "write"},
    ) == ("acme", ["write"])
    # With a map, only its values count: a bare "admin" is nothing.
    assert mapped(
        {"tenant": "acme", "scope": "admin read:docs"}, oidc_scope_map={"read:docs": "read"}
    ) == ("acme", ["read"])
    # Auth0's namespaced claim, dots and all; a token without scopes has none.
    assert mapped(
        {"https://ragapi.test/tenant": "acme"}, oidc_tenant_claim="https://ragapi.test/tenant"
    ) == ("acme", [])
    assert mapped({"scope": "read"}, oidc_default_tenant="shared") == ("shared", ["read"])


def test_a_token_without_a_usable_tenant_is_refused() -> None:
    for claims in ({"scope": "read"}, {"tenant": ""}, {"tenant": 7}, {"tenant": "x" * 65}):
        with pytest.raises(InvalidToken, match="names no tenant"):
            mapped(claims)


def test_settings_refuse_algorithms_without_a_public_key() -> None:
    for algorithms in (["none"], ["HS256"], ["RS256", "HS512"], []):
        with pytest.raises(ValidationError, match="oidc_algorithms"):
            Settings(oidc_algorithms=algorithms)
    with pytest.raises(ValidationError, match="oidc_audience is required"):
        Settings(oidc_issuer="https://sso.test")
