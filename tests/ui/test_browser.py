"""The UI in a real browser: `streamlit run ui/app.py` against the live API, driven with
Playwright in Debian's headless Chromium the way a user works it, mouse and keyboard. Leaves
a screenshot of the cited passage in its document at artifacts/ui.png."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import ROOT, Server, create_key, free_port
from tests.documents import CORPUS, make_pdf

# Debian's Chromium (.ci/run installs it): Playwright's own browser download is not possible
# here, and these flags keep it from reaching for the network or a GPU.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = ROOT / "artifacts" / "ui.png"


@pytest.fixture(scope="module")
def ui(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The UI as `python3 scripts/dev.py ui` starts it, pointed at the test server."""
    port = free_port()
    log = tmp_path_factory.mktemp("ui") / "streamlit.log"
    command = [sys.executable, "-m", "streamlit", "run", "ui/app.py"]
    command += ["--server.headless", "true", "--server.port", str(port)]
    command += ["--server.address", "127.0.0.1"]
    env = {**os.environ, "RAGAPI_UI_API_URL": server.url}
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=2).text == "ok":
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not start:\n{log.read_text()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def choose_page(page: Page, name: str) -> None:
    page.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()


def test_upload_ask_follow_a_citation_and_delete(ui: str, browser: Browser, server: Server) -> None:
    title = f"ownership-{uuid.uuid4().hex[:8]}"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(ui)

    key = page.get_by_role("textbox", name="API key")
    # A tenant of its own: other tests' documents on the shared server stay out of its answers.
    key.fill(create_key(server, "ui-browser", "read,write,admin"))
    key.press("Enter")

    # Upload a PDF and watch its job until it has succeeded.
    choose_page(page, "Upload")
    pdf = make_pdf(CORPUS["rust"].paragraphs)
    files = [{"name": f"{title}.pdf", "mimeType": "application/pdf", "buffer": pdf}]
    page.locator("input[type=file]").set_input_files(files=files)  # type: ignore[arg-type]
    page.get_by_role("button", name="Upload and index").click()
    expect(page.get_by_text(f"{title}.pdf: succeeded")).to_be_visible()

    # Ask; the answer streams in, with the PDF's passage among its citations.
    choose_page(page, "Ask")
    question = page.get_by_placeholder("Ask a question about your documents")
    question.fill(CORPUS["rust"].question)
    question.press("Enter")
    expect(page.get_by_text(CORPUS["rust"].answer).first).to_be_visible()
    citation = page.get_by_test_id("stExpander").filter(has_text=f"{title}, page 1")
    citation.get_by_text(title).click()
    expect(citation.get_by_text(CORPUS["rust"].answer)).to_be_visible()

    # The citation opens its document, the quoted passage marked in it.
    citation.get_by_role("button", name="Open in its document").click()
    expect(page.get_by_role("heading", name=title)).to_be_visible()
    expect(page.locator("mark").first).to_be_visible()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)

    # Delete it, confirming; it leaves the list.
    page.get_by_role("button", name="Delete this document").click()
    page.get_by_role("button", name="Delete for good").click()
    expect(page.get_by_text(f"Deleted {title}.")).to_be_visible()
    expect(page.get_by_role("heading", name=title)).to_have_count(0)
    page.get_by_role("textbox", name="Filter by title").fill(title)
    page.get_by_role("textbox", name="Filter by title").press("Enter")
    expect(page.get_by_text("No document title contains that text.")).to_be_visible()
