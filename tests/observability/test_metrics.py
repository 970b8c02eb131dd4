"""GET /api/v1/metrics: request and RAG-stage metrics from a real server, and totals that
stay right when several worker processes answer."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import UNLIMITED, Server, start_server
from tests.documents import CORPUS, make_text

API = "/api/v1"


def value(metrics: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", metrics, re.MULTILINE)
    assert match, f"{sample} not in metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("metrics") / "data", **UNLIMITED)
    yield running
    running.stop()


def test_requests_and_rag_stages_are_measured(fresh: Server) -> None:
    with fresh.client() as http:
        doc = CORPUS["saturn"]
        body = http.post(
            f"{API}/ingest",
            params={"wait": "true"},
            files=[("files", ("saturn.txt", make_text(doc.paragraphs), "text/plain"))],
        ).json()
        chunks = body["documents"][0]["chunk_count"]
        http.post(f"{API}/query", json={"question": doc.question})
        http.post(f"{API}/search", json={"query": doc.question})
        http.get(f"{API}/documents/doc_missing")
        metrics = http.get(f"{API}/metrics").text
    assert value(metrics, 'ragapi_requests_total{operation="queryDocuments",status="200"}') == 1
    assert value(metrics, 'ragapi_requests_total{operation="getDocument",status="404"}') == 1
    assert value(metrics, 'ragapi_request_duration_seconds_count{operation="searchChunks"}') == 1
    assert value(metrics, "ragapi_requests_in_flight") == 1  # the scrape itself
    assert value(metrics, 'ragapi_documents{status="ready"}') == 1
    assert value(metrics, "ragapi_chunks") == chunks
    assert value(metrics, 'ragapi_ingest_jobs{state="succeeded"}') == 1
    assert value(metrics, "ragapi_chunks_embedded_total") == chunks
    # Two questions embedded, plus the ingestion's batches.
    assert value(metrics, 'ragapi_stage_duration_seconds_count{stage="embedding"}') >= 3
    assert value(metrics, 'ragapi_stage_duration_seconds_count{stage="retrieval"}') == 2
    assert value(metrics, 'ragapi_stage_duration_seconds_count{stage="generation"}') == 1


def test_metrics_need_the_admin_scope(fresh: Server) -> None:
    with httpx.Client(base_url=fresh.url) as anonymous:
        assert anonymous.get(f"{API}/metrics").status_code == 401


def test_several_workers_report_one_total(
    tmp_path_factory: pytest.TempPathFactory, chroma_url: str, redis_url: str
) -> None:
    running = start_server(
        tmp_path_factory.mktemp("workers") / "data",
        workers="2",
        chroma_url=chroma_url,
        rate_limit_storage_url=redis_url,
        **UNLIMITED,
    )
    try:
        sent = 40
        for _ in range(sent):
            # A new connection each time, so the kernel spreads them over both workers.
            with running.client() as http:
                assert http.get(f"{API}/documents").status_code == 200
        with running.client() as http:
            metrics = http.get(f"{API}/metrics").text
        total = value(metrics, 'ragapi_requests_total{operation="listDocuments",status="200"}')
        assert total == sent
    finally:
        running.stop()
