"""The API's own docs pages in a real browser (Debian's headless Chromium): Swagger UI's "Try it
out" calls the server that served it, whatever its port, and neither page asks another machine
for anything (the `page` fixture fails the test on any such request)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Server, create_key, launch_server, wait_until_ready
from tests.identity_provider import Provider, oidc_provider, oidc_settings


def test_try_it_out_calls_the_server_on_its_own_port(page: Page, server: Server) -> None:
    # The test server runs on a free port, never the default 8000.
    assert urlsplit(server.url).port != 8000
    key = create_key(server, "docs-browser", "read")
    page.goto(f"{server.url}/docs")

    page.get_by_role("button", name="Authorize").first.click()
    dialog = page.locator(".dialog-ux")
    # The X-API-Key scheme's field (the dialog also offers the Bearer scheme of /v1).
    dialog.locator("input").first.fill(key)
    dialog.get_by_role("button", name="Apply credentials").first.click()
    dialog.locator("button.btn-done").first.click()

    operation = page.locator("#operations-documents-listDocuments")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()

    expect(operation.locator(".request-url pre")).to_have_text(
        f"{server.url}/api/v1/documents?limit=20"
    )
    expect(operation.locator(".curl-command")).to_contain_text(f"{server.url}/api/v1/documents")
    status = operation.locator(".live-responses-table tr.response .response-col_status")
    expect(status).to_have_text("200")
    expect(operation.locator(".live-responses-table .microlight").first).to_contain_text('"items"')


def test_redoc_renders_from_local_assets_only(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/redoc")
    expect(page.get_by_role("heading", name="ragapi", exact=False).first).to_be_visible()
    expect(page.get_by_text("List documents").first).to_be_attached()


@pytest.fixture(scope="module")
def identity_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Provider]:
    with oidc_provider(tmp_path_factory.mktemp("idp")) as running:
        yield running


@pytest.fixture(scope="module")
def server_with_provider(
    tmp_path_factory: pytest.TempPathFactory, identity_provider: Provider
) -> Iterator[Server]:
    folder: Path = tmp_path_factory.mktemp("oidc-docs")
    running = launch_server(folder / "data", **oidc_settings(identity_provider.issuer))
    yield wait_until_ready(running)
    running.stop()


def test_authorize_gets_a_token_from_the_identity_provider(
    page: Page, server_with_provider: Server, identity_provider: Provider
) -> None:
    page.goto(f"{server_with_provider.url}/docs")
    page.get_by_role("button", name="Authorize").first.click()
    # The OAuth2 scheme's client credentials, as a machine client's operator would type them.
    oauth2 = page.locator(".dialog-ux .auth-container").filter(has_text="clientCredentials")
    oauth2.locator("input[id^=client_id_]").fill("acme-reader")
    oauth2.locator("input[id^=client_secret_]").fill("acme-reader-secret")
    oauth2.locator("label[for='read-clientCredentials-checkbox-OAuth2']").click()  # scope read
    oauth2.get_by_role("button", name="Apply given OAuth2 credentials").click()
    expect(oauth2.get_by_role("button", name="Remove authorization")).to_be_visible()
    page.locator(".dialog-ux button.btn-done").first.click()

    operation = page.locator("#operations-documents-listDocuments")
    operation.locator(".opblock-summary").click()
    operation.get_by_role("button", name="Try it out").click()
    operation.get_by_role("button", name="Execute").click()
    expect(operation.locator(".curl-command")).to_contain_text("Authorization: Bearer eyJ")
    status = operation.locator(".live-responses-table tr.response .response-col_status")
    expect(status).to_have_text("200")
