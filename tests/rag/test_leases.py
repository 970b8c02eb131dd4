"""Job leases under a heartbeat: a batch slower than the whole lease keeps its job (the
heartbeat renews it, not the batch), while another claimer watches for expired leases."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest

from impl.rag.embeddings import EmbeddingModel
from impl.rag.service import RagService
from impl.rag.types import JobEvent
from tests.conftest import chroma_server
from tests.rag.conftest import make_settings, text_item

TENANT = "lease-test"
LEASE_SECONDS = 2.0
BATCH_SECONDS = 3.0  # each embedding call outlasts the lease


class SlowEmbeddings(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/embeddings answering with the packaged model's vectors after
    BATCH_SECONDS, as a remote embedding server under load does."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model: EmbeddingModel = self.server.model  # type: ignore[attr-defined]
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        time.sleep(BATCH_SECONDS)
        vectors = model.embed_documents(texts)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        answer = json.dumps({"object": "list", "data": data, "model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture
def slow_embeddings(embeddings: EmbeddingModel) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowEmbeddings)
    server.daemon_threads = True
    server.model = embeddings  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


class Events:
    """What became of the jobs a service handled (its StageObserver)."""

    def __init__(self) -> None:
        self.jobs: Counter[str] = Counter()

    def observe(
        self, stage: Literal["embedding", "retrieval", "generation"], seconds: float
    ) -> None:
        pass

    def chunks_embedded(self, count: int) -> None:
        pass

    def ingest_job(self, event: JobEvent) -> None:
        self.jobs[event] += 1


@pytest.fixture
def own_chroma(tmp_path: Path) -> Iterator[str]:
    """A Chroma server of its own: the session's holds collections of the packaged model, and
    the server refuses to start on a store of another model."""
    folder = tmp_path / "chroma"
    folder.mkdir()
    with chroma_server(folder) as url:
        yield url


def test_a_batch_slower_than_the_lease_keeps_its_job(
    tmp_path: Path, own_chroma: str, slow_embeddings: str
) -> None:
    settings = make_settings(
        tmp_path / "data",
        chroma_url=own_chroma,
        embedding_provider="openai",
        embedding_base_url=slow_embeddings,
        embedding_model="minilm",
        job_lease_seconds=LEASE_SECONDS,
        chunk_tokens=32,
        chunk_overlap_tokens=0,
    )
    # Two claimers on one registry, as two worker processes: whichever runs the job, the
    # other requeues any job whose lease it finds expired (every LEASE_SECONDS / 4) and would
    # then run it itself.
    events = [Events(), Events()]
    services = [RagService(settings, observer=observed) for observed in events]
    try:
        for service in services:
            service.start()
        text = " ".join(
            f"Sentence {i} about the lighthouse lamp and its keeper." for i in range(150)
        )
        job = services[0].submit_ingest(TENANT, [text_item(text)])
        finished = services[0].wait_for_job(TENANT, job.id, 120)
    finally:
        for service in services:
            service.close()
    assert finished.status == "succeeded", finished
    assert finished.chunks_total > 32  # at least two batches, each longer than the lease
    assert events[0].jobs + events[1].jobs == Counter({"claimed": 1, "succeeded": 1})
