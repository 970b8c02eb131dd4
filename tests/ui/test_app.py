"""The Streamlit UI (ui/app.py) driven with Streamlit's AppTest against a live API: what a
user does (paste a key, upload, watch the job, open, edit, delete, ask) and what they then see."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
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

    # The page followed the job's events until it succeeded, without being drawn again.
    [bar] = [p for p in app.progress if title in plain(p.text)]
    assert plain(bar.text).startswith(f"{title}.pdf: succeeded"), bar.text
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
        click(app, "Upload and index")  # followed to its end in that one run
        assert any(
            f"{name}-{attempt}.txt" in plain(shown)
            for shown in [p.text for p in app.progress if "succeeded" in p.text]
            + [i.value for i in app.info]
        ), [p.text for p in app.progress]
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


def requests_for(server: Server, path: str) -> Counter[str]:
    """The operations the server's access log records for `path`, counted."""
    counted: Counter[str] = Counter()
    for line in server.log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("message") == "request" and entry.get("path") == path:
                counted[entry["operation"]] += 1
    return counted


def test_upload_progress_comes_from_the_job_s_events_not_from_polling(
    app: AppTest, server: Server
) -> None:
    name = f"harbour-{uuid.uuid4().hex[:8]}"
    # About 70 passages: three batches of 32, so the job reports progress more than once.
    text = " ".join(
        f"Harbour log {name} entry {i}: the pilot boat met tanker {i % 37} at the outer buoy."
        for i in range(800)
    )
    go(app, "Upload")
    app.file_uploader[0].upload(f"{name}.txt", text.encode(), "text/plain")
    run(app)
    click(app, "Upload and index")

    [bar] = [p for p in app.progress if name in plain(p.text)]
    pattern = rf"{name}\.txt: succeeded, (\d+) of (\d+) passages indexed"
    shown = re.fullmatch(pattern, plain(bar.text))
    assert shown, bar.text
    assert shown[1] == shown[2] and int(shown[2]) > 64
    assert bar.value == 100

    [upload] = app.session_state["uploads"][:1]
    assert upload.last_event_id is not None  # where a reconnect would resume
    job = f"/api/v1/jobs/{upload.job.id}"
    # One event stream read it all; the job itself was never asked for.
    assert requests_for(server, f"{job}/events") == {"streamJobEvents": 1}
    assert requests_for(server, job) == {}


def search_ids(http: httpx.Client, query: str, metadata: dict[str, str]) -> set[str]:
    response = http.post("/api/v1/search", json={"query": query, "filters": {"metadata": metadata}})
    assert response.status_code == 200, response.text
    return {hit["document_id"] for hit in response.json()["results"]}


@pytest.fixture
def kelp(server: Server, ui_key: str) -> Iterator[dict[str, str]]:
    """A text with metadata, put in through the API, deleted afterwards."""
    title = f"kelp-{uuid.uuid4().hex[:8]}"
    with server.client(ui_key) as http:
        response = http.post(
            "/api/v1/ingest",
            params={"wait": "true"},
            json={
                "text": "Kelp forests grow along cold rocky coasts and shelter sea otters.",
                "title": title,
                "metadata": {"team": "marine", "year": 2025},
            },
        )
        assert response.status_code == 200, response.text
        [document] = response.json()["documents"]
        yield document
        http.delete(f"/api/v1/documents/{document['id']}")


def open_in_documents(app: AppTest, title: str) -> AppTest:
    go(app, "Documents")
    app.text_input(key="title_filter").set_value(title)
    run(app)
    return click(app, "Open")


def test_edit_a_document_s_title_and_metadata(
    app: AppTest, server: Server, ui_key: str, kelp: dict[str, str]
) -> None:
    open_in_documents(app, kelp["title"])
    assert app.text_input(key="edit_title").value == kelp["title"]
    assert json.loads(app.text_area(key="edit_metadata").value) == {"team": "marine", "year": 2025}

    # A key the contract refuses: the problem's detail names it, nothing is saved.
    app.text_area(key="edit_metadata").set_value('{"bad key": 1}')
    click(app, "Save title and metadata")
    [shown] = errors(app)
    assert "bad key" in shown, shown

    retitled = f"{kelp['title']} forests"
    app.text_input(key="edit_title").set_value(retitled)
    app.text_area(key="edit_metadata").set_value('{"team": "ocean"}')  # year taken out
    click(app, "Save title and metadata")
    assert not errors(app)
    assert [s.value for s in app.success] == [f"Saved {retitled}."]
    assert retitled in [plain(s.value) for s in app.subheader]
    assert f"**{retitled}**  \nsent as text · team: ocean" in texts(app)
    assert json.loads(app.text_area(key="edit_metadata").value) == {"team": "ocean"}

    with server.client(ui_key) as http:
        query = "kelp forests sea otters"
        assert kelp["id"] in search_ids(http, query, {"team": "ocean"})
        assert kelp["id"] not in search_ids(http, query, {"team": "marine"})
        assert http.get(f"/api/v1/documents/{kelp['id']}").json()["metadata"] == {"team": "ocean"}


def test_an_edit_of_a_document_changed_meanwhile_asks_for_a_reload(
    app: AppTest, server: Server, ui_key: str, kelp: dict[str, str]
) -> None:
    open_in_documents(app, kelp["title"])
    # Someone else retitles it after the form was filled in.
    theirs = f"{kelp['title']} (theirs)"
    with server.client(ui_key) as http:
        changed = http.patch(
            f"/api/v1/documents/{kelp['id']}",
            json={"title": theirs},
            headers={"content-type": "application/merge-patch+json"},
        )
        assert changed.status_code == 200, changed.text

    app.text_input(key="edit_title").set_value(f"{kelp['title']} (mine)")
    click(app, "Save title and metadata")
    [shown] = errors(app)
    assert shown.startswith("**Changed by someone else, reload.**"), shown
    with server.client(ui_key) as http:
        assert http.get(f"/api/v1/documents/{kelp['id']}").json()["title"] == theirs

    click(app, "Reload the document")
    assert not errors(app)
    assert app.text_input(key="edit_title").value == theirs
