"""The UI in a real browser: `streamlit run ui/app.py` against the live API, driven with
Playwright in Debian's headless Chromium the way a user works it, mouse and keyboard. Leaves
a screenshot of the cited passage in its document at artifacts/ui.png."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ROOT, Server, create_key, free_port
from tests.documents import CORPUS, make_pdf

SCREENSHOT = ROOT / "artifacts" / "ui.png"


@pytest.fixture(scope="module")
def ui_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui") / "streamlit.log"


@pytest.fixture(scope="module")
def ui(server: Server, ui_log: Path) -> Iterator[str]:
    """The UI as `python3 scripts/dev.py ui` starts it (.streamlit/config.toml's settings),
    next to the test server: told its port as `ragapi serve` is, by RAGAPI_PORT."""
    port = free_port()
    log = ui_log
    command = [sys.executable, "-m", "streamlit", "run", "ui/app.py", "--server.port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "RAGAPI_UI_API_URL"}
    env["RAGAPI_PORT"] = str(urlsplit(server.url).port)
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


def listening_addresses(port: int) -> set[str]:
    """The addresses a TCP port listens on, from the kernel's socket tables (Linux)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                packed = bytes.fromhex(address)
                # The kernel writes each 32-bit word in host order (little-endian here).
                words = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def test_the_ui_listens_on_loopback_and_asks_nobody_for_its_ip(ui: str, ui_log: Path) -> None:
    assert listening_addresses(urlsplit(ui).port or 0) == {"127.0.0.1"}
    # Without a set address Streamlit prints an "External URL" it asked an outside service for.
    printed = ui_log.read_text()
    assert f"URL: {ui}" in printed and "External URL" not in printed


def choose_page(page: Page, name: str) -> None:
    page.get_by_test_id("stSidebar").get_by_text(name, exact=True).click()


def test_upload_ask_follow_a_citation_and_delete(ui: str, page: Page, server: Server) -> None:
    title = f"ownership-{uuid.uuid4().hex[:8]}"
    page.goto(ui)
    # Started next to the server, the UI found it by itself.
    expect(page.get_by_role("textbox", name="API URL")).to_have_value(server.url)

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


# Every text a progress bar shows, as the page draws it (Streamlit redraws the bar in place).
RECORD_PROGRESS = """() => {
    window.progressSeen = [];
    new MutationObserver(() => {
        for (const bar of document.querySelectorAll('[data-testid="stProgress"]')) {
            const text = bar.innerText;
            if (!window.progressSeen.includes(text)) window.progressSeen.push(text);
        }
    }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_upload_progress_moves_as_the_job_s_events_come(
    ui: str, page: Page, server: Server
) -> None:
    name = f"harbour-{uuid.uuid4().hex[:8]}"
    # About 70 passages: the job reports progress after each batch of 32.
    text = " ".join(f"Harbour log {name} entry {i}: the tug met tanker {i}." for i in range(800))
    page.goto(ui)
    key = page.get_by_role("textbox", name="API key")
    key.fill(create_key(server, "ui-browser", "read,write"))
    key.press("Enter")
    choose_page(page, "Upload")
    files = [{"name": f"{name}.txt", "mimeType": "text/plain", "buffer": text.encode()}]
    page.locator("input[type=file]").set_input_files(files=files)  # type: ignore[arg-type]
    page.evaluate(RECORD_PROGRESS)
    page.get_by_role("button", name="Upload and index").click()
    expect(page.get_by_text(f"{name}.txt: succeeded")).to_be_visible(timeout=120_000)

    seen: list[str] = page.evaluate("window.progressSeen")
    counts = [re.search(r"(\d+) of (\d+) passages", shown) for shown in seen]
    partial = [c for c in counts if c and 0 < int(c[1]) < int(c[2])]
    assert partial, seen  # a bar part-way, before the job had finished
