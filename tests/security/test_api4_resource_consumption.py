"""API4:2023 Unrestricted Resource Consumption: the body limit holds while the body streams
in, every bound of the contract is enforced, and rate limits answer 429 with Retry-After."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from limits import parse

from impl.security.limits import LocalWindows, RateLimiter
from impl.settings import Settings
from tests.conftest import ROOT, Server, redis_server, start_server
from tests.documents import make_text

API = "/api/v1"
MB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_declared_oversized_body_is_refused_before_it_is_read(server: Server) -> None:
    # The session server's limit is 2 MB; 50 MB are announced and only a few bytes sent, so
    # an answer proves the server did not wait for the body.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST {API}/ingest HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {server.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {50 * MB}\r\n\r\n{{".encode()
        )
        answer = ""
        while "\r\n\r\n{" not in answer or not answer.endswith("}"):
            received = conn.recv(65536)
            if not received:
                break
            answer += received.decode("latin-1")
    status_line, _, rest = answer.partition("\r\n")
    assert status_line == "HTTP/1.1 413 Request Entity Too Large"
    assert "urn:ragapi:problem:payload-too-large" in rest


def test_a_streamed_oversized_body_is_cut_off_without_holding_it(server: Server) -> None:
    def fifty_megabytes() -> Iterator[bytes]:
        """A well-formed multipart upload of one 50 MB file, without a Content-Length."""
        yield (
            b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n'
            b"Content-Type: text/plain\r\n\r\n"
        )
        chunk = b"a" * MB
        for _ in range(50):
            yield chunk
        yield b"\r\n--x--\r\n"

    before = rss_bytes(server.process.pid)
    with server.client() as http:
        try:
            response = http.post(
                f"{API}/ingest",
                content=fifty_megabytes(),
                headers={"content-type": "multipart/form-data; boundary=x"},
            )
            assert response.status_code == 413
        except httpx.TransportError:
            pass  # the server may close the connection once it has answered 413
    assert rss_bytes(server.process.pid) - before < 20 * MB


def test_the_contract_bounds_are_enforced(server: Server) -> None:
    with server.client() as http:
        long_question = {"question": "why " * 600}
        assert http.post(f"{API}/query", json=long_question).status_code == 400
        assert http.post(f"{API}/search", json={"query": "x", "top_k": 51}).status_code == 400
        assert http.get(f"{API}/documents", params={"limit": 101}).status_code == 400
        too_many = [
            ("files", (f"{i}.txt", make_text([f"file {i}"]), "text/plain")) for i in range(21)
        ]
        response = http.post(f"{API}/ingest", files=too_many)
        assert response.status_code == 400
        assert "files" in response.json()["detail"].lower()


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("limited") / "data",
        rate_limit_query="5/minute",
        rate_limit_read="1000/minute",
    )
    yield running
    running.stop()


def test_hammering_search_gets_429_with_retry_after_and_is_counted(limited: Server) -> None:
    with limited.client() as http:
        statuses = []
        for _ in range(8):
            response = http.post(f"{API}/search", json={"query": "lamps"})
            statuses.append(response.status_code)
            assert response.headers["ratelimit-policy"] == '"query";q=5;w=60'
            assert response.headers["ratelimit"].startswith('"query";r=')
        assert statuses == [200] * 5 + [429] * 3
        refused = http.post(f"{API}/search", json={"query": "lamps"})
        assert refused.json()["type"] == "urn:ragapi:problem:rate-limited"
        assert 0 < int(refused.headers["retry-after"]) <= 60
        # Reads have a budget of their own.
        assert http.get(f"{API}/documents").status_code == 200
        metrics = http.get(f"{API}/metrics").text
    assert 'ragapi_rate_limited_total{operation="searchChunks"} 4.0' in metrics


def test_a_key_can_have_its_own_budget(limited: Server) -> None:
    with limited.client() as admin:
        created = admin.post(
            f"{API}/keys",
            json={"name": "tight", "scopes": ["read"], "rate_limits": {"query": "2/minute"}},
        ).json()
    with limited.client(created["key"]) as http:
        codes = [http.post(f"{API}/search", json={"query": "x"}).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_a_key_cannot_be_given_more_than_the_servers_budget(limited: Server) -> None:
    with limited.client() as admin:
        refused = admin.post(
            f"{API}/keys",
            json={
                "name": "greedy",
                "scopes": ["read"],
                # The server's query budget is 5/minute; 2/second is a higher rate.
                "rate_limits": {"query": "100000/minute", "ingest": "2/second", "read": "9/hour"},
            },
        )
        keys = admin.get(f"{API}/keys").json()["items"]
    assert refused.status_code == 400
    assert refused.json()["type"] == "urn:ragapi:problem:validation-failed"
    located = {e["location"]: e["message"] for e in refused.json()["errors"]}
    assert set(located) == {"body/rate_limits/query", "body/rate_limits/ingest"}
    assert "100000/minute is more than this server allows" in located["body/rate_limits/query"]
    assert "greedy" not in {k["name"] for k in keys}


def test_the_override_ceiling_is_a_factor_of_the_servers_rate() -> None:
    generous = RateLimiter(
        Settings(rate_limit_query="120/minute", rate_limit_max_override_factor=10)
    )
    assert generous.refused_overrides({"query": "1200/minute", "read": "600/minute"}) == {}
    assert generous.refused_overrides({"query": "20/second"}) == {}
    assert set(generous.refused_overrides({"query": "1201/minute"})) == {"query"}
    # A key stored with a higher budget (before the ceiling, or before the server lowered its
    # own) counts against the server's.
    strict = RateLimiter(Settings(rate_limit_query="120/minute"))
    assert strict.budget_item("query", "1000/minute") == parse("120/minute")
    assert strict.budget_item("query", "2/second") == parse("2/second")


def test_a_rate_limit_storage_that_is_down_is_a_503_logged_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("redis-down")
    with redis_server(folder) as url:
        running = start_server(folder / "data", rate_limit_storage_url=url, log_level="info")
        with running.client() as http:
            assert http.get(f"{API}/documents").status_code == 200
    try:  # redis-server is stopped now
        with running.client() as http:
            answers = [http.get(f"{API}/documents") for _ in range(5)]
            answers.append(http.post(f"{API}/search", json={"query": "lamps"}))
            health = http.get(f"{API}/health")
    finally:
        running.stop()
    for response in answers:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == "urn:ragapi:problem:dependency-unavailable"
        assert int(response.headers["retry-after"]) > 0
    assert health.status_code == 200
    log = running.log.read_text()
    assert "Traceback" not in log
    outage = [line for line in log.splitlines() if "rate-limit storage" in line]
    assert len(outage) == 1, outage
    assert url in outage[0] and "unreachable" in outage[0]


def test_without_keys_the_budget_is_counted_per_client_address(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    running = start_server(
        tmp_path_factory.mktemp("open") / "data", auth_enabled="false", rate_limit_query="3/minute"
    )
    try:
        with httpx.Client(base_url=running.url) as anonymous:
            codes = [
                anonymous.post(f"{API}/search", json={"query": "lamps"}).status_code
                for _ in range(5)
            ]
            refused = anonymous.post(f"{API}/search", json={"query": "lamps"})
    finally:
        running.stop()
    assert codes == [200, 200, 200, 429, 429]
    assert refused.headers["ratelimit-policy"] == '"query";q=3;w=60'
    assert int(refused.headers["retry-after"]) > 0


def test_several_workers_count_one_budget_in_redis(
    tmp_path_factory: pytest.TempPathFactory, chroma_url: str, redis_url: str
) -> None:
    running = start_server(
        tmp_path_factory.mktemp("shared-limits") / "data",
        workers="2",
        chroma_url=chroma_url,
        rate_limit_storage_url=redis_url,
        rate_limit_query="5/minute",
        log_level="info",
    )

    def search(_: int) -> int:
        with running.client() as http:
            return http.post(f"{API}/search", json={"query": "lamps"}).status_code

    def pids() -> set[int]:
        lines = running.log.read_text().splitlines()
        log = [json.loads(line) for line in lines if line[:1] == "{"]
        return {line["pid"] for line in log if line.get("operation") == "searchChunks"}

    codes: list[int] = []
    try:
        # New connections, several at once, in bursts until both workers have answered (which
        # worker accepts a connection is the kernel's choice): counted per worker, the second
        # one would grant requests of its own past the budget.
        with ThreadPoolExecutor(max_workers=6) as pool:
            for _ in range(10):
                codes.extend(pool.map(search, range(12)))
                if len(pids()) == 2:
                    break
        served_by = pids()
    finally:
        running.stop()
    assert codes.count(200) == 5 and codes.count(429) == len(codes) - 5
    assert len(served_by) == 2, "one worker answered every request: nothing was shared"


def test_several_workers_refuse_to_count_in_memory(tmp_path: Path, chroma_url: str) -> None:
    serve = subprocess.run(
        [sys.executable, "-m", "impl.cli", "serve", "--workers", "2"],
        cwd=ROOT,
        env={**os.environ, "RAGAPI_DATA_DIR": str(tmp_path), "RAGAPI_CHROMA_URL": chroma_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert serve.returncode != 0
    assert "RAGAPI_RATE_LIMIT_STORAGE_URL" in serve.stderr


def test_the_window_moves_and_idle_identities_are_forgotten() -> None:
    windows = LocalWindows()
    three_a_second = parse("3/second")
    answers = [windows.hit(three_a_second, "query", "k") for _ in range(4)]
    assert [(allowed, remaining) for allowed, remaining, _ in answers] == [
        (True, 2),
        (True, 1),
        (True, 0),
        (False, 0),
    ]
    assert 0 < answers[-1][2] <= 1  # seconds until the first hit leaves the window
    assert windows.hit(three_a_second, "query", "other")[0]  # identities count apart
    assert windows.hit(three_a_second, "read", "k")[0]  # and budgets too
    time.sleep(1.05)
    assert windows.hit(three_a_second, "query", "k")[:2] == (True, 2)
    # After every hit of an identity has left its window, a sweep forgets it.
    time.sleep(1.05)
    windows._next_sweep = 0
    assert windows.hit(three_a_second, "query", "new")[0]
    assert list(windows._hits) == [("query", "new")]
