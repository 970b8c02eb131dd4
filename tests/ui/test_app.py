"""The Streamlit UI (ui/app.py) driven with Streamlit's AppTest against a live API: what a
user does (paste a key, upload, watch the job, open, delete, ask) and what they then see."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import pytest
from streamlit.testing.v1 import AppTest

from tests.conftest import ROOT, Server, create_key
from tests.documents import CORPUS, make_pdf


@pytest.fixture(scope="module")
def ui_key(server: Server) -> str:
    """A tenant of its own, so documents other tests leave on the shared server never answer
    this module's questions."""
    return create_key(server, "ui-apptest", "read,write,admin")


@pytest.fixture
def app(server: Server, ui_key: str, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    """The UI with the live API's URL and key typed into its sidebar."""
    # As `streamlit run ui/app.py` does, so that app.py finds its sibling module.
    monkeypatch.syspath_prepend(str(ROOT / "ui"))
    at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=60)
    at.run()
    at.text_input(key="api_url").set_value(server.url)
    at.text_input(key="api_key").set_value(ui_key)
    return run(at)


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def click(at: AppTest, label: str) -> AppTest:
    """A click on the only button labelled `label`, as a user finds it."""
    [found] = [b for b in at.button if b.label == label]
    found.click()
    return run(at)


def plain(markdown: str) -> str:
    """Markdown as a user reads it: the app escapes punctuation in text it did not write."""
    return re.sub(r"\\(.)", r"\1", markdown)


def texts(at: AppTest) -> str:
    return plain("\n".join(m.value for m in [*at.markdown, *at.caption, *at.subheader]))


def errors(at: AppTest) -> list[str]:
    return [plain(e.value) for e in at.error]


def go(at: AppTest, page: str) -> AppTest:
    at.radio(key="page").set_value(page)
    return run(at)


def test_upload_watch_the_job_then_open_and_delete_the_document(app: AppTest) -> None:
    run_id = uuid.uuid4().hex[:8]
    title = f"ownership-{run_id}"
    go(app, "Upload")
    app.file_uploader[0].upload(f"{title}.pdf", make_pdf(CORPUS["rust"].paragraphs))
    run(app)
    click(app, "Upload and index")

    # The job shows until it has succeeded, the page refreshing as a user's browser does.
    deadline = time.monotonic() + 60
    while not any(f"{title}.pdf: succeeded" in plain(p.text) for p in app.progress):
        assert time.monotonic() < deadline, [p.text for p in app.progress]
        time.sleep(0.5)
        run(app)
    [bar] = [p for p in app.progress if title in plain(p.text)]
    assert bar.value == 100

    go(app, "Documents")
    app.text_input(key="title_filter").set_value(run_id)
    run(app)
    assert f"**{title}**" in texts(app)
    click(app, "Open")
    assert title in [plain(s.value) for s in app.subheader]
    assert "PDF" in texts(app) and "ready" in texts(app)
    passages = [e.label for e in app.expander]
    assert passages and passages[0] == "Passage 1 · page 1"

    click(app, "Delete this document")
    assert any(title in plain(w.value) for w in app.warning)
    click(app, "Delete for good")
    assert [s.value for s in app.success] == [f"Deleted {title}."]
    assert not app.subheader  # the open document closed with it
    assert [i.value for i in app.info] == ["No document title contains that text."]


def test_a_duplicate_upload_names_the_document_it_repeats(app: AppTest) -> None:
    name = f"lighthouse-{uuid.uuid4().hex[:8]}"
    content = f"Lighthouse {name} guides ships along a dangerous coast.".encode()
    go(app, "Upload")
    for attempt in ("first", "again"):
        app.file_uploader[0].upload(f"{name}-{attempt}.txt", content, "text/plain")
        run(app)
        click(app, "Upload and index")
        deadline = time.monotonic() + 60
        while not any(
            f"{name}-{attempt}.txt" in plain(shown)
            for shown in [p.text for p in app.progress if "succeeded" in p.text]
            + [i.value for i in app.info]
        ):
            assert time.monotonic() < deadline, [p.text for p in app.progress]
            time.sleep(0.5)
            run(app)
    assert [plain(i.value) for i in app.info] == [
        f"**{name}-again.txt** is a duplicate of {name}-first, already indexed: nothing new."
    ]
    assert not [p for p in app.progress if f"{name}-again" in plain(p.text)]


@pytest.fixture
def indexed(server: Server, ui_key: str) -> Iterator[dict[str, str]]:
    """A PDF put in through the API, deleted afterwards."""
    name = f"ownership-{uuid.uuid4().hex[:8]}.pdf"
    with server.client(ui_key) as http:
        response = http.post(
            "/api/v1/ingest",
            params={"wait": "true"},
            files={"files": (name, make_pdf(CORPUS["rust"].paragraphs), "application/pdf")},
        )
        assert response.status_code == 200, response.text
        [document] = response.json()["documents"]
        yield document
        http.delete(f"/api/v1/documents/{document['id']}")


def test_the_answer_streams_in_and_a_citation_opens_its_passage(
    app: AppTest, indexed: dict[str, str]
) -> None:
    app.chat_input[0].set_value(CORPUS["rust"].question)
    run(app)
    assert not errors(app)
    assert CORPUS["rust"].answer in texts(app)
    cited = [e for e in app.expander if indexed["title"] in plain(e.label)]
    assert cited and cited[0].label.startswith("[1] ")
    assert cited[0].label.endswith(", page 1")
    cited[0].button[0].click()
    run(app)

    assert app.radio(key="page").value == "Documents"
    assert indexed["title"] in [plain(s.value) for s in app.subheader]
    [passage] = [e for e in app.expander if e.label.endswith(" · cited")]
    assert any("<mark>" in h.value for h in passage.html)


def test_failures_show_as_the_problem_s_title_and_detail(app: AppTest, server: Server) -> None:
    # A refusal by the API: a title filter longer than the spec allows.
    go(app, "Documents")
    app.text_input(key="title_filter").set_value("x" * 201)
    run(app)
    [shown] = errors(app)
    assert re.fullmatch(r"\*\*\w[^*]*\*\*  \n.*query/title: .*200 characters", shown), shown

    # Caught before any call: metadata that is not JSON.
    app.text_input(key="title_filter").set_value("")
    go(app, "Upload")
    app.file_uploader[0].upload("notes.txt", b"Some notes.", "text/plain")
    app.text_input(key="metadata").set_value("{team: research")
    run(app)
    click(app, "Upload and index")
    [shown] = errors(app)
    assert shown.startswith("**The metadata is not JSON**")

    # A key the API does not know.
    app.text_input(key="api_key").set_value("rk_wrong")
    go(app, "Documents")
    assert any("The API key is not valid" in e for e in errors(app)), errors(app)

    # No API at that address, or no address at all.
    app.text_input(key="api_url").set_value("http://127.0.0.1:9")
    run(app)
    assert any(e.startswith("**Cannot reach the API**") for e in errors(app)), errors(app)
    app.text_input(key="api_url").set_value("localhost")
    run(app)
    assert errors(app) == ["**Not an API URL**  \nlocalhost is not like http://host:port."]
