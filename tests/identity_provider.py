"""A real OpenID Connect provider on loopback for the sign-in tests: oidc-provider (a certified
implementation), run by Node.js from tests/security/oidc (`npm ci` there first; .ci/run does).
Its machine clients get JWT access tokens for AUDIENCE by the client credentials grant."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import UNLIMITED, free_port

PROVIDER_DIR = Path(__file__).resolve().parent / "security" / "oidc"
AUDIENCE = "https://ragapi.test"
# ragapi's leeway in these tests, and its shortest time between two fetches of the keys.
LEEWAY_SECONDS = 1
MIN_REFRESH_SECONDS = 3


@dataclass
class Provider:
    issuer: str
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Started (again): on the same port it is the same issuer, with a new signing key."""
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                ["node", "provider.mjs"],
                cwd=PROVIDER_DIR,
                env={**os.environ, "PORT": str(self.port), "AUDIENCE": AUDIENCE},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.issuer}/test/jwks-requests", timeout=5).raise_for_status()
                return
            except httpx.HTTPError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = self.log.read_text()
                    raise RuntimeError(f"the provider did not start:\n{log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def token(self, client: str, scope: str, resource: str | None = None) -> str:
        """An access token from the token endpoint by the client credentials grant."""
        form = {"grant_type": "client_credentials", "scope": scope}
        if resource is not None:
            form["resource"] = resource
        answer = httpx.post(
            f"{self.issuer}/token", data=form, auth=(client, f"{client}-secret"), timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["token_type"] == "Bearer"
        return str(answer.json()["access_token"])

    def jwks_requests(self) -> int:
        return int(httpx.get(f"{self.issuer}/test/jwks-requests", timeout=10).json()["count"])


@contextmanager
def oidc_provider(folder: Path) -> Iterator[Provider]:
    """A real OpenID provider on a free loopback port."""
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(f"run `npm ci` in {PROVIDER_DIR} (.ci/run does)")
    port = free_port()
    provider = Provider(f"http://127.0.0.1:{port}", port, folder / f"oidc-{port}.log")
    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


def oidc_settings(issuer: str) -> dict[str, str]:
    """ragapi's settings to trust `issuer`, with a short leeway and refresh interval so that
    tests need not wait long."""
    return {
        "oidc_issuer": issuer,
        "oidc_audience": AUDIENCE,
        "oidc_leeway_seconds": str(LEEWAY_SECONDS),
        "oidc_jwks_min_refresh_seconds": str(MIN_REFRESH_SECONDS),
        **UNLIMITED,
    }
