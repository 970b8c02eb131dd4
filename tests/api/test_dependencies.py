"""A store that stops (a Chroma server, Redis, PostgreSQL) makes every request that needs it a
503 `dependency-unavailable` with Retry-After, never a 500; readiness names it; the log says so
once when it goes and once when it is back; and the same ragapi process serves again when the
store does, without a restart. Real servers on loopback, stopped and started on the same port."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import chromadb
import httpx

from impl.rag.store import collection_name
from tests.conftest import (
    UNLIMITED,
    Postgres,
    Server,
    chroma_server,
    free_port,
    redis_server,
    start_server,
)

API = "/api/v1"
ALL_UP = {"registry": "up", "vector_store": "up", "originals": "up", "embeddings": "up"}


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:ragapi:problem:dependency-unavailable"
    assert int(response.headers["retry-after"]) > 0


def readiness(server: Server) -> tuple[int, dict[str, str]]:
    response = httpx.get(f"{server.url}{API}/health/ready", timeout=30)
    assert response.json()["status"] == ("ready" if response.status_code == 200 else "not_ready")
    return response.status_code, response.json()["components"]


def assert_logged_once(server: Server, name: str) -> None:
    """One line when the outage started, one when it ended, and no stack trace at all."""
    lines = server.log.read_text().splitlines()
    assert not [line for line in lines if "Traceback" in line or '"exception"' in line]
    went = [line for line in lines if name in line and "unreachable" in line]
    came_back = [line for line in lines if name in line and "reachable again" in line]
    assert (len(went), len(came_back)) == (1, 1), lines


def retrieval_requests(http: httpx.Client) -> list[httpx.Response]:
    return [
        http.get(f"{API}/documents"),
        http.post(f"{API}/search", json={"query": "polishing brass lamps"}),
        http.post(f"{API}/query", json={"question": "How are brass lamps polished?"}),
    ]


def ingest_one(
    http: httpx.Client, text: str = "Brass lamps are polished with vinegar and salt."
) -> str:
    answer = http.post(f"{API}/ingest?wait=true", json={"text": text})
    assert answer.status_code == 200, answer.text
    assert answer.json()["job"]["status"] == "succeeded"
    document_id: str = answer.json()["documents"][0]["id"]
    return document_id


def assert_served(http: httpx.Client, document_id: str) -> None:
    listed, searched, answered = retrieval_requests(http)
    assert [r.status_code for r in (listed, searched, answered)] == [200, 200, 200]
    assert document_id in [d["id"] for d in listed.json()["items"]]
    assert searched.json()["results"][0]["document_id"] == document_id


def vector_ids(chroma_url: str, document_id: str) -> list[str]:
    host, port = chroma_url.removeprefix("http://").split(":")
    collection = chromadb.HttpClient(host=host, port=int(port)).get_collection(
        collection_name("default")
    )
    return list(collection.get(where={"document_id": document_id})["ids"])


def wait_for_job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        job: dict[str, Any] = http.get(f"{API}/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.5)


def test_a_chroma_server_that_stops_is_a_503_until_it_is_back(tmp_path: Path) -> None:
    folder = tmp_path / "chroma"
    folder.mkdir()
    port = free_port()
    chroma = contextlib.ExitStack()
    url = chroma.enter_context(chroma_server(folder, port))
    running = start_server(tmp_path / "data", chroma_url=url, log_level="info", **UNLIMITED)
    try:
        with running.client() as http:
            document_id = ingest_one(http)
            doomed_id = ingest_one(http, "Tea is brewed for three minutes.")
            chroma.close()  # `chroma run` is stopped
            listed, searched, answered = retrieval_requests(http)
            deleted = http.delete(f"{API}/documents/{doomed_id}")
            down = readiness(running)
            queued = http.post(f"{API}/ingest", json={"text": "Copper kettles hold water."})
            time.sleep(3)  # long enough for an ingestion worker to try it
            waiting = http.get(f"{API}/jobs/{queued.json()['job']['id']}").json()["status"]
            chroma.enter_context(chroma_server(folder, port))
            assert_served(http, document_id)
            back = readiness(running)
            ingested = wait_for_job(http, queued.json()["job"]["id"])
            kettles = http.post(f"{API}/search", json={"query": "copper kettles"}).json()
            deleted_again = http.delete(f"{API}/documents/{doomed_id}")
            doomed_vectors = vector_ids(url, doomed_id)
    finally:
        running.stop()
        chroma.close()
    assert listed.status_code == 200  # the registry alone answers it
    # Ingestion waits for the vector store, then finishes with no restart and no lost attempt.
    assert queued.status_code == 202
    assert waiting in ("queued", "running")
    assert ingested["status"] == "succeeded", ingested
    assert kettles["results"][0]["document_id"] == ingested["document_ids"][0]
    assert_unavailable(searched)
    assert_unavailable(answered)
    assert_unavailable(deleted)
    # The DELETE retried once the store is back finishes what the first began.
    assert deleted_again.status_code == 204, deleted_again.text
    assert doomed_vectors == []
    assert down == (503, {**ALL_UP, "vector_store": "down"})
    assert back == (200, ALL_UP)
    assert_logged_once(running, f"vector store {url}")


def _process_listening_on(port: int) -> int:
    """The pid of the process whose command line names ``--port PORT``."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            words = cmdline.read_bytes().split(b"\0")
            if b"--port" in words and words[words.index(b"--port") + 1] == str(port).encode():
                return int(cmdline.parent.name)
    raise LookupError(port)


def test_a_chroma_server_that_hangs_is_a_503_within_the_timeout(tmp_path: Path) -> None:
    """A server that accepts connections but never answers (here: stopped with SIGSTOP) is down
    once RAGAPI_CHROMA_TIMEOUT_SECONDS pass, not a request held forever; it serves again when
    the server wakes."""
    folder = tmp_path / "chroma"
    folder.mkdir()
    port = free_port()
    with chroma_server(folder, port) as url:
        chroma = _process_listening_on(port)
        running = start_server(
            tmp_path / "data",
            chroma_url=url,
            chroma_timeout_seconds="2",
            log_level="info",
            **UNLIMITED,
        )
        try:
            with running.client() as http:
                document_id = ingest_one(http)
                os.kill(chroma, signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    searched = http.post(f"{API}/search", json={"query": "polishing brass lamps"})
                    waited = time.monotonic() - started
                finally:
                    os.kill(chroma, signal.SIGCONT)
                assert_served(http, document_id)
        finally:
            running.stop()
    assert_unavailable(searched)
    assert waited < 15, waited  # one timeout of 2 s, not a retry after it, not forever


def test_redis_that_stops_is_a_503_until_it_is_back(tmp_path: Path) -> None:
    port = free_port()
    redis = contextlib.ExitStack()
    url = redis.enter_context(redis_server(tmp_path, port))
    running = start_server(tmp_path / "data", rate_limit_storage_url=url, log_level="info")
    try:
        with running.client() as http:
            document_id = ingest_one(http)
            redis.close()  # redis-server is stopped
            answers = [*retrieval_requests(http), http.get(f"{API}/keys")]
            health = http.get(f"{API}/health")
            down = readiness(running)
            redis.enter_context(redis_server(tmp_path, port))
            assert_served(http, document_id)
            back = readiness(running)
    finally:
        running.stop()
        redis.close()
    for response in answers:
        assert_unavailable(response)
    assert health.status_code == 200  # liveness asks no store
    every_up = {**ALL_UP, "rate_limit_storage": "up"}
    assert down == (503, {**every_up, "rate_limit_storage": "down"})
    assert back == (200, every_up)
    assert_logged_once(running, f"rate-limit storage {url}")


def test_postgresql_that_stops_is_a_503_until_it_is_back(
    tmp_path: Path, postgres: Postgres, postgres_url: str
) -> None:
    running = start_server(
        tmp_path / "data",
        registry_url=postgres_url,
        registry_auto_upgrade="true",
        log_level="info",
        **UNLIMITED,
    )
    try:
        with running.client() as http:
            document_id = ingest_one(http)
            postgres.stop()
            try:
                answers = [*retrieval_requests(http), http.get(f"{API}/keys")]
                answers.append(http.get(f"{API}/documents/{document_id}"))
                down = readiness(running)
            finally:
                postgres.start()
            assert_served(http, document_id)
            keys = http.get(f"{API}/keys")  # the key store, on the same engine, is back too
            back = readiness(running)
    finally:
        running.stop()
    for response in answers:
        assert_unavailable(response)
    assert keys.status_code == 200
    assert down == (503, {**ALL_UP, "registry": "down"})
    assert back == (200, ALL_UP)
    assert_logged_once(running, "registry postgresql+psycopg://")
