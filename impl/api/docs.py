"""The contract served as written, and the docs rendered from it with locally served assets
(the docs must work on a machine with no internet). Where an OpenID Connect provider is
configured, its token endpoint replaces the contract's placeholder, so Swagger UI's Authorize
dialog gets tokens from it."""

from __future__ import annotations

import json
from pathlib import Path

import fastapi_offline
import yaml
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, Response

from impl.security.oidc import OidcVerifier

SPEC_PATH = Path(__file__).resolve().parents[2] / "openapi" / "v1.yaml"
# fastapi-offline exists to ship the Swagger UI and ReDoc bundles inside its wheel.
ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs/assets"
REDOC_JS_URL = "/docs/redoc.standalone.js"
# ReDoc's sidebar shows Redocly's logo from their CDN: the served bundle has an empty image in its
# place, so no docs page requests an outside address.
REDOCLY_LOGO_URL = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_SVG = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"
# The contract's placeholder for the identity provider's token endpoint (its OAuth2 scheme).
PLACEHOLDER_TOKEN_URL = b"https://idp.example.com/oauth/token"


def offline_redoc_bundle() -> bytes:
    bundle = (ASSETS / "redoc.standalone.js").read_bytes()
    if REDOCLY_LOGO_URL not in bundle:
        raise RuntimeError("redoc.standalone.js no longer names Redocly's logo URL: check it")
    return bundle.replace(REDOCLY_LOGO_URL, EMPTY_SVG)


def mount_docs(app: FastAPI, tokens: OidcVerifier | None) -> None:
    written_yaml = SPEC_PATH.read_bytes()
    # (yaml, json) once final: as written, or with the provider's token endpoint.
    served: list[tuple[bytes, bytes]] = []
    redoc_js = offline_redoc_bundle()
    title = "ragapi API"

    async def spec() -> tuple[bytes, bytes]:
        """The contract, with the provider's token endpoint where one is configured; until its
        discovery document has been read the token URL stays the placeholder, and the next
        request tries again."""
        if served:
            return served[0]
        spec_yaml, final = written_yaml, True
        if tokens is not None:
            token_url = await run_in_threadpool(tokens.token_endpoint)
            if token_url is None:
                final = False
            else:
                spec_yaml = spec_yaml.replace(PLACEHOLDER_TOKEN_URL, token_url.encode())
        both = (spec_yaml, json.dumps(yaml.safe_load(spec_yaml)).encode())
        if final:
            served.append(both)
        return both

    async def openapi_json() -> Response:
        return Response((await spec())[1], media_type="application/json")

    async def openapi_yaml() -> Response:
        return Response((await spec())[0], media_type="application/yaml")

    async def redoc_bundle() -> Response:
        return Response(redoc_js, media_type="text/javascript")

    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=title,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
        )

    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=title,
            redoc_js_url=REDOC_JS_URL,
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS), name="docs-assets")
    for path, endpoint in (
        ("/openapi.json", openapi_json),
        ("/openapi.yaml", openapi_yaml),
        ("/docs", swagger_ui),
        ("/redoc", redoc),
        (REDOC_JS_URL, redoc_bundle),
    ):
        app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)
