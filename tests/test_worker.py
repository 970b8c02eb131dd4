"""`ragapi worker` on its own: it runs the jobs a queue-only service (RAGAPI_INGEST_WORKERS=0)
registers, logs what it does as JSON, serves its metrics and liveness, shares
prometheus-client's multiprocess folder with an API on the same machine, and stops promptly
on SIGTERM. The whole scaled-out deployment is tests/test_topology.py."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from impl.errors import ServiceUnavailable
from impl.rag.service import RagService
from tests.conftest import ROOT, free_port
from tests.rag.conftest import make_settings, text_item
from tests.test_topology import Worker, ledger, metric, wait_until_live

# A tenant of its own: the session's Chroma server holds other tests' collections.
TENANT = "worker-test"


def test_a_worker_refuses_embedded_chroma(tmp_path: Path) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "impl.cli", "worker"],
        cwd=ROOT,
        env={**os.environ, "RAGAPI_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "set RAGAPI_CHROMA_URL" in refused.stderr


def test_a_worker_runs_what_a_queue_only_api_queues(tmp_path: Path, chroma_url: str) -> None:
    registry_url = f"sqlite:///{tmp_path / 'api' / 'registry.db'}"
    shared = {"registry_url": registry_url, "chroma_url": chroma_url, "chunk_tokens": 32}
    api = RagService(
        make_settings(
            tmp_path / "api",
            ingest_workers=0,
            ingest_queue_size=1,
            originals_url="registry://",
            **shared,
        )
    )
    try:
        api.start()
        job = api.submit_ingest(TENANT, [text_item(ledger("mill", 200), title="Mill")])
        # Nothing in this process runs jobs: the registry's queue is full with one.
        with pytest.raises(ServiceUnavailable, match="queue is full"):
            api.submit_ingest(TENANT, [text_item("Another document.")])
        assert api.get_job(TENANT, job.id).status == "queued"

        metrics_dir = tmp_path / "prometheus"  # what `ragapi serve --workers N` would read
        metrics_dir.mkdir()
        port = free_port()
        env = {
            **os.environ,
            "RAGAPI_DATA_DIR": str(tmp_path / "worker"),
            "RAGAPI_WORKER_PORT": str(port),
            "RAGAPI_ORIGINALS_URL": "registry://",
            "RAGAPI_LOG_LEVEL": "info",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            **{f"RAGAPI_{k.upper()}": str(v) for k, v in shared.items()},
        }
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "impl.cli", "worker"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            worker = wait_until_live(Worker(tmp_path / "worker", port, process, log))
            finished = api.wait_for_job(TENANT, job.id, 180)
            assert finished.status == "succeeded", finished
            chunks = api.get_document(TENANT, finished.document_ids[0]).chunk_count
            assert chunks > 1
            assert api.search(TENANT, "crate 7 of the mill ledger", top_k=1)

            own = httpx.get(f"{worker.url}/metrics").text
            assert metric(own, "ragapi_chunks_embedded_total") == chunks
            assert metric(own, 'ragapi_ingest_job_events_total{event="claimed"}') == 1
            assert metric(own, 'ragapi_ingest_job_events_total{event="succeeded"}') == 1
            registry = CollectorRegistry()
            MultiProcessCollector(registry, str(metrics_dir))  # type: ignore[no-untyped-call]
            beside_the_api = generate_latest(registry).decode()
            assert metric(beside_the_api, "ragapi_chunks_embedded_total") == chunks
            assert httpx.get(f"{worker.url}/health").json() == {"status": "ok"}

            assert worker.stop(signal.SIGTERM) < 15
            assert process.returncode == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        api.close()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = {(line["logger"], line["level"], line["message"]) for line in lines}
    claimed = f"job {job.id} claimed by "
    assert any(
        logger == "impl.rag.jobs" and level == "info" and re.match(claimed, message)
        for logger, level, message in messages
    ), messages
    assert ("impl.worker", "info", "worker stopped") in messages
