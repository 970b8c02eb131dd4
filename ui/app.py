"""ragapi's Streamlit UI: a client of the HTTP API, through the generated Python client.

    python3 scripts/dev.py serve     # the API on http://127.0.0.1:8000
    python3 scripts/dev.py ui        # this UI on http://127.0.0.1:8501

The sidebar's API URL starts as RAGAPI_UI_API_URL, or else as the address `ragapi serve` takes
from the same environment and .env (RAGAPI_HOST, RAGAPI_PORT).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO

import httpx
import streamlit as st

# `streamlit run ui/app.py` puts ui/ on sys.path, so the sibling module imports as `api`.
from api import (
    ApiError,
    connect,
    default_api_url,
    follow_job,
    result,
    stream_answer,
    succeeded,
)
from streamlit.delta_generator import DeltaGenerator

from generated.client import Client
from generated.client.api.documents import (
    delete_document,
    get_document,
    list_document_chunks,
    list_documents,
    patch_document,
)
from generated.client.api.health import get_readiness
from generated.client.api.ingestion import ingest_documents
from generated.client.models import (
    Chunk,
    Document,
    DocumentPatch,
    DocumentPatchMetadataType0,
    IngestUpload,
    Job,
    Metadata,
    Problem,
    QueryResponse,
    Readiness,
    StreamRetrieval,
    StreamToken,
)
from generated.client.types import UNSET, File, Unset

DEFAULT_API_URL = default_api_url()
PAGES = ("Ask", "Upload", "Documents")
DOCUMENTS_PER_PAGE = 20
CHUNKS_PER_PAGE = 100
KINDS = {
    "application/pdf": "PDF",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "Word",
    "text/html": "HTML",
    "text/markdown": "Markdown",
    "text/plain": "Text",
}
STATUS = {"ready": ":green[ready]", "pending": ":orange[indexing]", "failed": ":red[failed]"}
MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+\-.!|~$:])")


@dataclass
class Upload:
    """A job started from this session, as it was last seen."""

    label: str
    job: Job
    titles: dict[str, str]  # document id -> title, of the documents the upload answered with
    last_event_id: str | None = None  # of the job's events seen so far: where to resume

    @property
    def finished(self) -> bool:
        return self.job.status in ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Edit:
    """The open document as its edit form was filled in from: a change is sent only while the
    document still has this ETag (If-Match), so no one else's change is overwritten unseen."""

    doc_id: str
    etag: str
    title: str
    metadata: dict[str, object]


@dataclass(frozen=True)
class Turn:
    question: str
    answer: QueryResponse


@dataclass(frozen=True)
class Focus:
    """Where a cited quote sits in its document's text."""

    chunk_id: str
    start_char: int
    end_char: int


def md(text: str) -> str:
    """Text that Streamlit's Markdown shows as it is: no emphasis, links, math or colours."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", text)


def passages(count: int) -> str:
    return f"{count} passage" if count == 1 else f"{count} passages"


def init_state() -> None:
    defaults: dict[str, object] = {
        "uploads": [],  # Upload, newest first
        "uploader": 0,  # bumped after an upload, for a fresh, empty file picker
        "conversation": [],  # Turn, oldest first
        "doc_id": None,  # the open document
        "focus": None,  # the cited passage to show in the open document
        "confirm_delete": None,  # (id, title) of the document a delete waits on
        "cursors": [],  # the cursors of the document pages before this one
        "cursor": None,
        "notice": None,  # a success to show after st.rerun()
        "edit": None,  # Edit of the open document, from when its form was filled in
    }
    for name, value in defaults.items():
        st.session_state.setdefault(name, value)


@contextmanager
def reported() -> Iterator[None]:
    """A failed call shows as the problem's title and detail where it was made, never as a
    traceback; the rest of the block is skipped."""
    try:
        yield
    except ApiError as error:
        show_error(error)
    except httpx.HTTPError as error:
        show_error(ApiError.unreachable(st.session_state.api_url, error))


def show_error(error: ApiError) -> None:
    st.error(f"**{md(error.title)}**  \n{md(error.detail)}")


def open_document(doc_id: str, focus: Focus | None) -> None:
    st.session_state.page = "Documents"
    st.session_state.doc_id = doc_id
    st.session_state.focus = focus


def close_document() -> None:
    st.session_state.doc_id = None
    st.session_state.focus = None
    reload_edit()


def reload_edit() -> None:
    """The edit form is filled in again from the document as it is read next."""
    st.session_state.edit = None


def ask_delete(doc_id: str, title: str) -> None:
    st.session_state.confirm_delete = (doc_id, title)


def cancel_delete() -> None:
    st.session_state.confirm_delete = None


def first_page() -> None:
    st.session_state.cursors = []
    st.session_state.cursor = None


def next_page(cursor: str) -> None:
    st.session_state.cursors.append(st.session_state.cursor)
    st.session_state.cursor = cursor


def previous_page() -> None:
    st.session_state.cursor = st.session_state.cursors.pop()


def sidebar() -> tuple[str, str]:
    with st.sidebar:
        st.title("ragapi")
        url = st.text_input("API URL", value=DEFAULT_API_URL, key="api_url")
        key = st.text_input(
            "API key or access token",
            type="password",
            key="api_key",
            help="An API key: the server prints an admin key on its first start; `ragapi keys "
            "create` or POST /api/v1/keys make more. Or an access token (a JWT) from the "
            "identity provider the server trusts (RAGAPI_OIDC_ISSUER).",
        )
        st.radio("Page", PAGES, key="page")
    return url, key


def show_readiness(client: Client) -> None:
    with reported():
        response = get_readiness.sync_detailed(client=client)
        # 503 also answers with the components' states, so it is no error to report here.
        if not isinstance(response.parsed, Readiness):
            raise ApiError.from_body(response.status_code, response.content)
        states = response.parsed.components.to_dict()
        down = [name.replace("_", " ") for name, state in states.items() if state == "down"]
        if down:
            st.warning(f"The API is up, but not ready: {', '.join(down)} down.")
        else:
            st.caption("The API is ready.")


def passage(text: str, mark: tuple[int, int] | None = None) -> None:
    """A passage shown exactly as extracted (no Markdown), `mark` (offsets in `text`)
    highlighted."""
    if mark is not None and 0 <= mark[0] < mark[1] <= len(text):
        start, end = mark
        body = (
            f"{html.escape(text[:start])}<mark>{html.escape(text[start:end])}</mark>"
            f"{html.escape(text[end:])}"
        )
    else:
        body = html.escape(text)
    st.html(f'<div class="passage" style="white-space: pre-wrap">{body}</div>')


# Ask ----------------------------------------------------------------------------------------


def ask_page(client: Client) -> None:
    st.header("Ask your documents")
    conversation: list[Turn] = st.session_state.conversation
    for number, turn in enumerate(conversation):
        with st.chat_message("user"):
            st.markdown(md(turn.question))
        with st.chat_message("assistant"):
            show_answer(number, turn.answer)
    if not conversation:
        st.caption("Answers cite the passages they come from: open a citation to read it.")
    question = st.chat_input("Ask a question about your documents")
    if not question:
        return
    with st.chat_message("user"):
        st.markdown(md(question))
    with st.chat_message("assistant"), reported():
        answer = stream_answer(client, question, streaming_view())
        conversation.append(Turn(question, answer))
        # Drawn again from the conversation, with its citations, like every earlier answer.
        st.rerun()


def streaming_view() -> Callable[[StreamRetrieval | StreamToken], None]:
    """Where the answer's events show while it is being written."""
    status = st.empty()
    words = st.empty()
    text = ""

    def show(event: StreamRetrieval | StreamToken) -> None:
        nonlocal text
        if isinstance(event, StreamRetrieval):
            status.caption(f"Writing from {len(event.results)} passages…")
        else:
            text += event.text
            words.markdown(md(text) + " ▌")

    return show


def show_answer(number: int, answer: QueryResponse) -> None:
    if not answer.found:
        st.info(md(answer.answer))
        return
    st.markdown(md(answer.answer))
    st.caption(f"Answered by {answer.provider} in {answer.timings.total_ms:.0f} ms.")
    for citation in answer.citations:
        page = f", page {citation.page}" if isinstance(citation.page, int) else ""
        with st.expander(f"[{citation.marker}] {md(citation.document_title)}{page}"):
            passage(citation.quote)
            st.button(
                "Open in its document",
                key=f"cite-{number}-{citation.marker}",
                on_click=open_document,
                args=(
                    citation.document_id,
                    Focus(citation.chunk_id, citation.start_char, citation.end_char),
                ),
            )


# Upload -------------------------------------------------------------------------------------


def upload_page(client: Client) -> None:
    st.header("Upload documents")
    files = st.file_uploader(
        "PDF, Word, HTML, Markdown or plain-text files",
        accept_multiple_files=True,
        key=f"files-{st.session_state.uploader}",
    )
    metadata = st.text_input(
        "Metadata for these files (a JSON object, optional)",
        placeholder='{"team": "research"}',
        key="metadata",
    )
    if st.button("Upload and index", type="primary", disabled=not files):
        with reported():
            body = IngestUpload(
                files=[
                    File(payload=BytesIO(f.getvalue()), file_name=f.name, mime_type=f.type)
                    for f in files or []
                ],
                metadata=parse_metadata(metadata),
            )
            accepted = result(ingest_documents.sync_detailed(client=client, body=body))
            # The names as uploaded: a duplicate answers with the document already held.
            label = ", ".join(f.name for f in files or [])
            titles = {d.id: d.title for d in accepted.documents}
            st.session_state.uploads.insert(0, Upload(label, accepted.job, titles))
            st.session_state.uploader += 1
            st.rerun()
    uploads: list[Upload] = st.session_state.uploads
    if uploads:
        st.subheader("Jobs")
        places = [(upload, st.empty()) for upload in uploads]
        for upload, place in places:
            with place.container():
                show_job(upload)
        # Jobs still running are followed by their events, one after another, each bar
        # redrawn as an event comes; one left (another page chosen meanwhile) is followed
        # again from its last event the next time this page is drawn.
        for upload, place in places:
            if not upload.finished:
                with reported():
                    follow(client, upload, place)


def parse_metadata(text: str) -> Metadata | Unset:
    if not text.strip():
        return UNSET
    return Metadata.from_dict(metadata_object(text))


def metadata_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError("The metadata is not JSON", str(error)) from None
    if not isinstance(value, dict):
        raise ApiError("The metadata is not a JSON object", 'Write it as {"team": "research"}.')
    return value


def follow(client: Client, upload: Upload, place: DeltaGenerator) -> None:
    def show(job: Job, last_event_id: str | None) -> None:
        upload.job, upload.last_event_id = job, last_event_id
        with place.container():
            show_job(upload)

    upload.job = follow_job(client, upload.job, show, upload.last_event_id)
    with place.container():
        show_job(upload)


def show_job(upload: Upload) -> None:
    job = upload.job
    if job.status == "failed":
        reason = (
            ApiError.from_problem(job.error)
            if isinstance(job.error, Problem)
            else ApiError("Failed", "The API gave no reason.")
        )
        st.error(f"**{md(upload.label)}** failed: {md(reason.title)}  \n{md(reason.detail)}")
        return
    # Content the tenant already holds is not indexed again: the job answers with the
    # existing document, and its passages are not counted here.
    held = ", ".join(md(upload.titles.get(i, i)) for i in job.duplicate_document_ids)
    if job.duplicate_document_ids and len(job.duplicate_document_ids) == len(job.document_ids):
        st.info(f"**{md(upload.label)}** is a duplicate of {held}, already indexed: nothing new.")
        return
    done, total = job.chunks_done, job.chunks_total
    fraction = done / total if total else float(job.status == "succeeded")
    duplicates = f" ({held} already held)" if held else ""
    st.progress(
        fraction,
        text=f"{md(upload.label)}: {job.status}, {done} of {total} passages indexed{duplicates}",
    )


# Documents ----------------------------------------------------------------------------------


def documents_page(client: Client) -> None:
    st.header("Documents")
    if st.session_state.notice:
        st.success(st.session_state.notice)
        st.session_state.notice = None
    if st.session_state.confirm_delete:
        with reported():
            confirm_delete(client, *st.session_state.confirm_delete)
    if st.session_state.doc_id:
        with reported():
            show_document(client, st.session_state.doc_id)
        st.divider()
    title = st.text_input("Filter by title", key="title_filter", on_change=first_page).strip()
    with reported():
        page = result(
            list_documents.sync_detailed(
                client=client,
                limit=DOCUMENTS_PER_PAGE,
                cursor=st.session_state.cursor or UNSET,
                title=title or UNSET,
            )
        )
        if not page.items:
            st.info(
                "No document title contains that text."
                if title
                else "No documents yet: add some on the Upload page."
            )
        for document in page.items:
            document_row(document)
        if st.session_state.cursors or page.next_cursor:
            back, forward = st.columns(2)
            back.button(
                "Previous page", disabled=not st.session_state.cursors, on_click=previous_page
            )
            if page.next_cursor:
                forward.button("Next page", on_click=next_page, args=(page.next_cursor,))


def document_row(document: Document) -> None:
    name, state, size, show, delete = st.columns([6, 2, 2, 1, 1], vertical_alignment="center")
    about = [document.filename or "sent as text"]
    if metadata := document.metadata.to_dict():
        about.append(", ".join(f"{key}: {value}" for key, value in metadata.items()))
    name.markdown(f"**{md(document.title)}**  \n{md(' · '.join(about))}")
    state.markdown(f"{KINDS[document.media_type]} · {STATUS[document.status]}")
    size.caption(passages(document.chunk_count))
    show.button("Open", key=f"open-{document.id}", on_click=open_document, args=(document.id, None))
    delete.button(
        "Delete",
        key=f"delete-{document.id}",
        on_click=ask_delete,
        args=(document.id, document.title),
    )


def confirm_delete(client: Client, doc_id: str, title: str) -> None:
    with st.container(border=True):
        st.warning(
            f"Delete **{md(title)}**? Its passages leave every search and answer, and its "
            "stored original is removed."
        )
        yes, no = st.columns(2)
        no.button("Cancel", key="cancel-delete", on_click=cancel_delete)
        if yes.button("Delete for good", type="primary", key="confirm-delete"):
            succeeded(delete_document.sync_detailed(client=client, doc_id=doc_id))
            cancel_delete()
            if st.session_state.doc_id == doc_id:
                close_document()
            st.session_state.notice = f"Deleted {title}."
            st.rerun()


def show_document(client: Client, doc_id: str) -> None:
    response = get_document.sync_detailed(client=client, doc_id=doc_id)
    document = result(response)
    heading, close = st.columns([10, 1], vertical_alignment="center")
    heading.subheader(md(document.title))
    close.button("Close", key="close-document", on_click=close_document)
    st.caption(
        " · ".join(
            [
                md(document.filename or "sent as text"),
                KINDS[document.media_type],
                f"{document.size_bytes:,} bytes",
                passages(document.chunk_count),
                STATUS[document.status],
                f"added {document.created_at:%Y-%m-%d %H:%M %Z}",
            ]
        )
    )
    if isinstance(document.error, str):
        st.error(md(document.error))
    metadata = document.metadata.to_dict()
    if metadata:
        st.json(metadata, expanded=False)
    st.button(
        "Delete this document",
        key="delete-open",
        on_click=ask_delete,
        args=(document.id, document.title),
    )
    edit_form(client, document, response.headers.get("etag", ""))
    focus: Focus | None = st.session_state.focus
    chunks, more = document_chunks(client, doc_id, focus)
    for chunk in chunks:
        cited = focus is not None and chunk.id == focus.chunk_id
        page = f" · page {chunk.page}" if isinstance(chunk.page, int) else ""
        with st.expander(
            f"Passage {chunk.index + 1}{page}{' · cited' if cited else ''}", expanded=cited
        ):
            if focus is not None and cited:
                passage(
                    chunk.text,
                    (focus.start_char - chunk.start_char, focus.end_char - chunk.start_char),
                )
            else:
                passage(chunk.text)
    if more:
        st.caption(f"The first {len(chunks)} passages of {document.chunk_count}.")


def edit_form(client: Client, document: Document, etag: str) -> None:
    edit: Edit | None = st.session_state.edit
    # Filled in once from the document as read, then kept as typed until saved or reloaded;
    # filled in again when Streamlit dropped what was typed (the form left the page).
    if edit is None or edit.doc_id != document.id or "edit_title" not in st.session_state:
        edit = Edit(document.id, etag, document.title, document.metadata.to_dict())
        st.session_state.edit = edit
        st.session_state.edit_title = document.title
        st.session_state.edit_metadata = json.dumps(edit.metadata, indent=2, ensure_ascii=False)
    with st.form("edit-document"):
        st.text_input("Title", key="edit_title")
        st.text_area("Metadata (a JSON object)", key="edit_metadata")
        save = st.form_submit_button("Save title and metadata")
    if save:
        with reported():
            save_edit(client, edit)


def save_edit(client: Client, edit: Edit) -> None:
    """Sends what the form changed as a JSON Merge Patch: a key taken out of the metadata is
    sent as null, which removes it."""
    title = st.session_state.edit_title.strip()
    metadata = metadata_object(st.session_state.edit_metadata or "{}")
    changes = {key: value for key, value in metadata.items() if edit.metadata.get(key) != value}
    changes |= {key: None for key in edit.metadata if key not in metadata}
    if title == edit.title and not changes:
        st.info("Nothing changed: nothing to save.")
        return
    patch = DocumentPatch(
        title=title if title != edit.title else UNSET,
        metadata=DocumentPatchMetadataType0.from_dict(changes) if changes else UNSET,
    )
    response = patch_document.sync_detailed(
        client=client, doc_id=edit.doc_id, body=patch, if_match=edit.etag
    )
    if response.status_code == 412:
        st.error(
            "**Changed by someone else, reload.**  \nThis document changed after you opened it "
            "for editing, so your change was not saved: reload it to see what it holds now."
        )
        st.button("Reload the document", key="reload-edit", on_click=reload_edit)
        return
    saved = result(response)
    reload_edit()
    st.session_state.notice = f"Saved {saved.title}."
    st.rerun()


def document_chunks(client: Client, doc_id: str, focus: Focus | None) -> tuple[list[Chunk], bool]:
    """The first page of the document's passages, and the pages after it up to the cited
    one; and whether more follow."""
    chunks: list[Chunk] = []
    cursor: str | Unset = UNSET
    while True:
        page = result(
            list_document_chunks.sync_detailed(
                client=client, doc_id=doc_id, limit=CHUNKS_PER_PAGE, cursor=cursor
            )
        )
        chunks += page.items
        found = focus is None or any(chunk.id == focus.chunk_id for chunk in page.items)
        if not isinstance(page.next_cursor, str) or found:
            return chunks, isinstance(page.next_cursor, str)
        cursor = page.next_cursor


def main() -> None:
    st.set_page_config(page_title="ragapi", page_icon="📚", layout="wide")
    init_state()
    url, key = sidebar()
    try:
        client = connect(url, key)
    except ApiError as error:
        with st.sidebar:
            show_error(error)
        return
    pages = {"Ask": ask_page, "Upload": upload_page, "Documents": documents_page}
    with client:
        with st.sidebar:
            show_readiness(client)
        pages[st.session_state.page](client)


main()
