"""The Python client generated from the spec (generated/client) drives a live server through
the whole flow a user takes, with typed models both ways. tests/clients/test_types.py
type-checks this module with mypy, so a client that drifts from the spec fails here twice."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from io import BytesIO
from typing import TypeVar

import httpx
import pytest

from generated.client import AuthenticatedClient
from generated.client.api.documents import (
    delete_document,
    get_document,
    list_document_chunks,
    list_documents,
    patch_document,
    replace_document,
)
from generated.client.api.ingestion import (
    cancel_job,
    get_job,
    ingest_documents,
    list_jobs,
    stream_job_events,
)
from generated.client.api.retrieval import query_documents, search_chunks
from generated.client.models import (
    DocumentPatch,
    DocumentPatchMetadataType0,
    IngestText,
    IngestUpload,
    Job,
    Metadata,
    Problem,
    QueryRequest,
    Retrieval,
    SearchFilters,
    SearchRequest,
)
from generated.client.models.retrieval_mode import RETRIEVAL_MODE_VALUES
from generated.client.types import File, Response
from tests.conftest import Server
from tests.documents import CORPUS, make_pdf

T = TypeVar("T")


@pytest.fixture
def api(server: Server) -> Iterator[AuthenticatedClient]:
    with AuthenticatedClient(
        base_url=server.url,
        token=server.api_key,
        prefix="",
        auth_header_name="X-API-Key",
        timeout=httpx.Timeout(120),
    ) as client:
        yield client


def parsed(response: Response[T | Problem], status: int = 200) -> T:
    """The typed body of a call that answered `status`."""
    assert response.status_code == status, response.content
    assert response.parsed is not None and not isinstance(response.parsed, Problem)
    return response.parsed


def finished(api: AuthenticatedClient, job_id: str) -> Job:
    deadline = time.monotonic() + 120
    while True:
        job = parsed(get_job.sync_detailed(client=api, job_id=job_id))
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} is still {job.status}"
        time.sleep(0.2)


def test_ingest_list_search_query_and_delete(api: AuthenticatedClient) -> None:
    run = uuid.uuid4().hex[:8]  # names this run's documents on a server other tests share
    rust, saturn = CORPUS["rust"], CORPUS["saturn"]

    # A PDF as multipart, in the background: 202, then the job runs to success.
    upload = IngestUpload(
        files=[
            File(
                payload=BytesIO(make_pdf(rust.paragraphs)),
                file_name=f"ownership-{run}.pdf",
                mime_type="application/pdf",
            )
        ],
        metadata=Metadata.from_dict({"run": run, "year": 2026}),
    )
    accepted = parsed(ingest_documents.sync_detailed(client=api, body=upload), 202)
    assert accepted.job.status in ("queued", "running", "succeeded")
    job = finished(api, accepted.job.id)
    assert job.status == "succeeded", job.error
    assert job.chunks_done == job.chunks_total > 0
    [pdf_id] = job.document_ids
    pdf = parsed(get_document.sync_detailed(client=api, doc_id=pdf_id))
    assert (pdf.title, pdf.filename) == (f"ownership-{run}", f"ownership-{run}.pdf")
    assert (pdf.media_type, pdf.status) == ("application/pdf", "ready")
    assert pdf.metadata.to_dict() == {"run": run, "year": 2026}

    # Text as JSON, waiting for it: 200 with the finished job and the ready document.
    text = IngestText(text="\n\n".join(saturn.paragraphs), title=f"Saturn {run}")
    ingested = parsed(ingest_documents.sync_detailed(client=api, body=text, wait=True))
    assert ingested.job.status == "succeeded"
    [typed] = ingested.documents
    assert (typed.title, typed.filename, typed.media_type) == (f"Saturn {run}", None, "text/plain")
    assert typed.status == "ready" and typed.chunk_count >= 1

    # Both are listed, newest first.
    listed = parsed(list_documents.sync_detailed(client=api, title=run))
    assert [d.id for d in listed.items] == [typed.id, pdf_id]

    # The PDF's passages, in order, say which page they start on.
    chunks = parsed(list_document_chunks.sync_detailed(client=api, doc_id=pdf_id)).items
    assert [c.index for c in chunks] == list(range(pdf.chunk_count))
    assert chunks[0].page == 1 and all(isinstance(c.page, int) for c in chunks)
    assert rust.answer in " ".join(" ".join(c.text.split()) for c in chunks)

    # Search and answers come from the right document of the two.
    ours = SearchFilters(document_ids=[pdf_id, typed.id])
    search = SearchRequest(query=saturn.question, top_k=3, filters=ours)
    results = parsed(search_chunks.sync_detailed(client=api, body=search)).results
    assert results[0].document_id == typed.id
    # Each retrieval mode through the generated models, each hit explained by its signals.
    for mode in sorted(RETRIEVAL_MODE_VALUES):
        by_mode = SearchRequest(
            query=saturn.question, top_k=3, filters=ours, retrieval=Retrieval(mode=mode)
        )
        found = parsed(search_chunks.sync_detailed(client=api, body=by_mode)).results
        assert found[0].document_id == typed.id, mode
        signals = set(found[0].explain.to_dict())
        expected = {"dense", "lexical"} if mode == "hybrid" else {mode}
        assert signals and signals <= expected, (mode, signals)
    question = QueryRequest(question=rust.question, filters=ours)
    answer = parsed(query_documents.sync_detailed(client=api, body=question))
    assert answer.found and answer.citations
    cited = answer.citations[0]
    assert cited.document_id == pdf_id and f"[{cited.marker}]" in answer.answer
    assert any(cited.quote in c.text for c in chunks if c.id == cited.chunk_id)

    # A new version under the same id, then a merge patch guarded by the ETag.
    revised = IngestText(text="\n\n".join(saturn.paragraphs[::-1]))
    replaced = parsed(
        replace_document.sync_detailed(client=api, doc_id=typed.id, body=revised), 202
    )
    assert finished(api, replaced.job.id).status == "succeeded"
    # Its job's events, followed with the client's request for them (a client generated for
    # JSON bodies reads the event stream through its own httpx client).
    request = stream_job_events._get_kwargs(replaced.job.id)
    with api.get_httpx_client().stream(**request) as response:
        assert response.status_code == 200
        events = [
            json.loads(line.removeprefix("data: "))
            for line in response.iter_lines()
            if line.startswith("data: ")
        ]
    assert [e["type"] for e in events][:2] == ["job.queued", "job.running"]
    assert [e["type"] for e in events][-2:] == ["document.ready", "job.finished"]
    assert events[-2]["document_id"] == typed.id and events[-2]["data"]["version"] == 2
    current = get_document.sync_detailed(client=api, doc_id=typed.id)
    assert parsed(current).version == 2
    etag = current.headers["etag"]
    changes = DocumentPatchMetadataType0.from_dict({"run": run, "revised": True})
    patch = DocumentPatch(title=f"Saturn {run} (revised)", metadata=changes)
    patched = parsed(
        patch_document.sync_detailed(client=api, doc_id=typed.id, body=patch, if_match=etag)
    )
    assert patched.title == f"Saturn {run} (revised)" and patched.version == 2
    assert patched.metadata.to_dict() == {"run": run, "revised": True}
    stale = patch_document.sync_detailed(client=api, doc_id=typed.id, body=patch, if_match=etag)
    assert stale.status_code == 412 and isinstance(stale.parsed, Problem)
    jobs = parsed(list_jobs.sync_detailed(client=api, limit=100)).items
    assert replaced.job.id in [j.id for j in jobs]
    done = cancel_job.sync_detailed(client=api, job_id=replaced.job.id)
    assert done.status_code == 409 and isinstance(done.parsed, Problem)

    # Deleted: gone from the documents and from search, told as a 404 problem.
    for doc_id in (pdf_id, typed.id):
        assert delete_document.sync_detailed(client=api, doc_id=doc_id).status_code == 204
        gone = get_document.sync_detailed(client=api, doc_id=doc_id)
        assert gone.status_code == 404 and isinstance(gone.parsed, Problem)
        assert gone.parsed.type_ == "urn:ragapi:problem:not-found"
    assert parsed(search_chunks.sync_detailed(client=api, body=search)).results == []


def test_refusals_arrive_as_typed_problems(api: AuthenticatedClient) -> None:
    missing = get_job.sync_detailed(client=api, job_id="job_doesnotexist")
    assert missing.status_code == 404 and isinstance(missing.parsed, Problem)
    assert missing.parsed.type_ == "urn:ragapi:problem:not-found"
    assert "job_doesnotexist" in str(missing.parsed.detail)

    # The client sends what the spec allows; the server's own limits still answer.
    too_many = SearchRequest(query="anything", top_k=51)
    invalid = search_chunks.sync_detailed(client=api, body=too_many)
    assert invalid.status_code == 400 and isinstance(invalid.parsed, Problem)
    assert isinstance(invalid.parsed.errors, list)
    assert [e.location for e in invalid.parsed.errors] == ["body/top_k"]
