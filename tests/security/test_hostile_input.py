"""Hostile input, sent as an attacker would, to a real server: files built to exhaust memory or
time in a parser, JSON nested or sized to crash a decoder, clients that send their request a
byte at a time. Each is refused with the right 4xx problem within its limit, while the server
keeps its memory, keeps answering, and keeps what it held."""

from __future__ import annotations

import functools
import glob
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from generated.operations import OPERATIONS, Operation
from tests.conftest import UNLIMITED, Server, start_server
from tests.documents import CORPUS, make_lying_docx, make_text

API = "/api/v1"
MB = 1024 * 1024
PROBLEM = "urn:ragapi:problem:"

PARSE_SECONDS = 2.0
PARSE_WORKERS = 2
PARSE_MEMORY_BYTES = 512 * MB
HEADER_SECONDS = 2.0
BODY_SECONDS = 3.0
# The limit's margin: 10% of it or one second, whichever is more.
MARGIN = max(0.1 * PARSE_SECONDS, 1.0)

# 512 MiB of "A" that the zip's directory declares as 5,000 bytes.
LYING_DOCX_REAL_BYTES = 512 * MB
NESTED_HTML = b"<html><body>" + b"<div>" * 10**6 + b"x" + b"</div>" * 10**6 + b"</body></html>"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(
        tmp_path_factory.mktemp("hostile") / "data",
        max_parse_seconds=str(PARSE_SECONDS),
        parse_workers=str(PARSE_WORKERS),
        max_parse_memory_bytes=str(PARSE_MEMORY_BYTES),
        header_timeout_seconds=str(HEADER_SECONDS),
        body_timeout_seconds=str(BODY_SECONDS),
        log_level="info",
        **UNLIMITED,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def held_document(hostile: Server) -> str:
    """A document ingested before the attack: its id."""
    saturn = CORPUS["saturn"]
    with hostile.client() as http:
        ingested = http.post(
            f"{API}/ingest",
            params={"wait": "true"},
            files=[("files", ("saturn.txt", make_text(saturn.paragraphs), "text/plain"))],
        ).json()
    assert ingested["job"]["status"] == "succeeded", ingested
    document_id: str = ingested["documents"][0]["id"]
    return document_id


@pytest.fixture(scope="module")
def lying_docx() -> bytes:
    return make_lying_docx(LYING_DOCX_REAL_BYTES)


def tree_rss_bytes(root: int) -> int:
    """RSS of a process and all its descendants (the parser processes are grandchildren)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss_bytes(pid)
        todo += children.get(pid, [])
    return total


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # gone meanwhile


def upload(server: Server, name: str, content: bytes) -> tuple[httpx.Response, float]:
    with server.client() as http:
        started = time.monotonic()
        response = http.post(f"{API}/ingest", files=[("files", (name, content))])
        return response, time.monotonic() - started


def assert_problem(response: httpx.Response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == PROBLEM + slug


def test_a_docx_that_lies_about_its_size_is_refused_without_inflating_it(
    hostile: Server, lying_docx: bytes, held_document: str
) -> None:
    # Measured once the server has parsed a document (its parsers' forkserver is running).
    before = tree_rss_bytes(hostile.process.pid)
    response, elapsed = upload(hostile, "memo.docx", lying_docx)
    # Only the 5,000 declared bytes are unpacked: not a Word document's XML.
    assert_problem(response, 400, "unreadable-document")
    assert "damaged" in response.json()["detail"]
    assert elapsed < 2.0
    assert tree_rss_bytes(hostile.process.pid) - before < 50 * MB


def test_deeply_nested_html_is_refused_at_the_parse_time_limit_and_memory_comes_back(
    hostile: Server, held_document: str
) -> None:
    before = tree_rss_bytes(hostile.process.pid)
    response, elapsed = upload(hostile, "nested.html", NESTED_HTML)
    assert_problem(response, 413, "document-too-large")
    assert f"longer than {PARSE_SECONDS:g} seconds" in response.json()["detail"]
    assert PARSE_SECONDS * 0.9 <= elapsed <= PARSE_SECONDS + MARGIN
    assert tree_rss_bytes(hostile.process.pid) - before < 50 * MB


def test_eight_hostile_uploads_at_once_cost_bounded_memory_and_the_server_keeps_serving(
    hostile: Server, lying_docx: bytes, held_document: str
) -> None:
    pid = hostile.process.pid
    server_before = rss_bytes(pid)
    tree_before = tree_rss_bytes(pid)
    health_seconds: list[float] = []
    tree_peak = server_peak = 0
    attack_over = threading.Event()

    def watch() -> None:
        nonlocal tree_peak, server_peak
        with httpx.Client(base_url=hostile.url, timeout=30) as probe:
            while not attack_over.is_set():
                started = time.monotonic()
                assert probe.get(f"{API}/health").status_code == 200
                health_seconds.append(time.monotonic() - started)
                tree_peak = max(tree_peak, tree_rss_bytes(pid))
                server_peak = max(server_peak, rss_bytes(pid))
                time.sleep(0.1)

    files = [("memo.docx", lying_docx), ("nested.html", NESTED_HTML)] * 4
    watcher = ThreadPoolExecutor(1).submit(watch)
    with ThreadPoolExecutor(len(files)) as pool:
        answers = list(pool.map(lambda f: upload(hostile, *f)[0], files))
    attack_over.set()
    watcher.result()

    for (name, _), response in zip(files, answers, strict=True):
        if name.endswith(".docx"):
            assert_problem(response, 400, "unreadable-document")
        else:
            assert_problem(response, 413, "document-too-large")
    assert max(health_seconds) < 1.0, health_seconds
    # The parsers' memory is bounded by the settings: parse_workers processes, each within
    # max_parse_memory_bytes; the server itself holds the uploads (11 MB of HTML each) and
    # little else.
    assert tree_peak - tree_before < PARSE_WORKERS * PARSE_MEMORY_BYTES
    assert server_peak - server_before < 200 * MB
    # ...and it comes back: the parser processes are gone.
    assert tree_rss_bytes(pid) - tree_before < 50 * MB
    # What was there before the attack is still found.
    with hostile.client() as http:
        found = http.post(f"{API}/search", json={"query": CORPUS["saturn"].question}).json()
    assert found["results"][0]["document_id"] == held_document


# --------------------------------------------------------------------------- JSON bodies

NESTED_ARRAYS = b"[" * 10_000 + b"]" * 10_000
NESTED_OBJECTS = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
HOSTILE_BODIES: dict[str, tuple[bytes, str]] = {
    # name: (body, Content-Type)
    "arrays nested 10,000 deep": (NESTED_ARRAYS, "application/json"),
    "objects nested 100,000 deep": (NESTED_OBJECTS, "application/json"),
    "a field nested 5,000 deep": (
        b'{"query": "x", "filters": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
        "application/json",
    ),
    "an integer of 5,000 digits": (b'{"query": "x", "top_k": ' + b"9" * 5000 + b"}", ""),
    "a number past double range": (b'{"query": "x", "top_k": 1e999}', ""),
    "NaN": (b'{"query": "x", "top_k": NaN}', ""),
    "UTF-16 text": ('{"query": "x"}'.encode("utf-16"), ""),
    "a UTF-8 byte order mark": (b'\xef\xbb\xbf{"query": "x"}', ""),
    "bytes that are not UTF-8": (b'{"query": "\xff\xfe"}', ""),
    "an unpaired surrogate": (b'{"query": "\\ud800"}', ""),
    "an empty body": (b"", ""),
    "null": (b"null", ""),
    "a bare string": (b'"query"', ""),
    "truncated JSON": (b'{"query": "x"', ""),
    "plain text": (b"query=x", "text/plain"),
    "XML": (b"<query>x</query>", "application/xml"),
    "form data": (b"query=x", "application/x-www-form-urlencoded"),
    "JSON that says UTF-16": (
        '{"query": "x"}'.encode("utf-16"),
        "application/json; charset=utf-16",
    ),
    "a multipart body without a boundary": (b"--x\r\n", "multipart/form-data"),
    "a broken multipart body": (b"--x\r\nnonsense", "multipart/form-data; boundary=x"),
    "multipart metadata nested 10,000 deep": (
        b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\nhello\r\n'
        b'--x\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n'
        + b'{"a":' * 10_000
        + b"1"
        + b"}" * 10_000
        + b"\r\n--x--\r\n",
        "multipart/form-data; boundary=x",
    ),
    "no Content-Type": (b'{"query": "x"}', "none"),
}
BODY_OPERATIONS = [op for op in OPERATIONS.values() if op.body]


def concrete_path(path: str) -> str:
    return path.replace("{", "").replace("}", "_0")


@pytest.mark.parametrize("operation", BODY_OPERATIONS, ids=lambda op: op.operation_id)
def test_no_body_a_client_can_send_is_a_500(hostile: Server, operation: Operation) -> None:
    op = operation
    declared = next(iter(op.body))
    failures = []
    with hostile.client() as http:
        for name, (body, content_type) in HOSTILE_BODIES.items():
            headers = {"content-type": content_type or "application/json"}
            if content_type == "none":
                headers = {}
            elif content_type == "" and declared == "multipart/form-data":
                headers = {"content-type": "application/json"}
            response = http.request(
                op.method, concrete_path(op.path), content=body, headers=headers
            )
            if "openai" in op.tags:  # OpenAI's error body, which its SDKs read
                error = response.headers.get("content-type") == "application/json"
                if not (400 <= response.status_code < 500 and error):
                    failures.append(f"{name}: {response.status_code} {response.text[:200]}")
                elif response.json()["error"]["type"] != "invalid_request_error":
                    failures.append(f"{name}: type {response.json()['error']['type']}")
                continue
            problem = response.headers.get("content-type") == "application/problem+json"
            if not (400 <= response.status_code < 500 and problem):
                failures.append(f"{name}: {response.status_code} {response.text[:200]}")
            elif not response.json()["type"].startswith(PROBLEM):
                failures.append(f"{name}: type {response.json()['type']}")
    assert not failures, failures


def test_deep_json_is_a_400_with_its_own_type(hostile: Server) -> None:
    with hostile.client() as http:
        response = http.post(
            f"{API}/search", content=NESTED_ARRAYS, headers={"content-type": "application/json"}
        )
    assert_problem(response, 400, "json-too-deep")


def test_the_sweep_left_no_stack_trace_in_the_log(hostile: Server) -> None:
    with hostile.client() as http:  # one more, in case this test runs alone
        http.post(
            f"{API}/query", content=NESTED_OBJECTS, headers={"content-type": "application/json"}
        )
    log = hostile.log.read_text()
    assert "Traceback" not in log
    assert '"status": 500' not in log


# --------------------------------------------------------------------------- slow clients


def host_port(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def seconds_until_closed(conn: socket.socket, trickle: bytes, limit: float) -> float:
    """Send `trickle` a byte every half second until the server closes the connection; the
    seconds that took (or `limit` when it did not)."""
    started = time.monotonic()
    conn.settimeout(0.5)
    for byte in trickle:
        if time.monotonic() - started > limit:
            break
        try:
            conn.sendall(bytes([byte]))
            if conn.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:  # reset: closed too
            return time.monotonic() - started
    return limit


def test_fifty_clients_sending_headers_a_byte_at_a_time_are_cut_off(hostile: Server) -> None:
    address = host_port(hostile)
    request = f"GET {API}/documents HTTP/1.1\r\nHost: x\r\nX-API-Key: {hostile.api_key}\r\n"
    request += "X-Padding: " + "p" * 200 + "\r\n\r\n"
    connections = [socket.create_connection(address) for _ in range(50)]
    silent = socket.create_connection(address)  # sends nothing at all
    try:
        with ThreadPoolExecutor(len(connections)) as pool:
            trickle = functools.partial(seconds_until_closed, trickle=request.encode(), limit=30)
            during = pool.map(trickle, connections)
            # Served meanwhile.
            with hostile.client() as http:
                assert http.get(f"{API}/documents").status_code == 200
            times = list(during)
        silent.settimeout(HEADER_SECONDS + 2)
        assert silent.recv(1) == b""
    finally:
        for conn in [*connections, silent]:
            conn.close()
    assert max(times) <= HEADER_SECONDS + 1.5, times


def test_a_body_sent_a_byte_at_a_time_gets_408(hostile: Server) -> None:
    body = json.dumps({"query": "Saturn rings " * 20}).encode()
    with socket.create_connection(host_port(hostile)) as conn:
        conn.sendall(
            f"POST {API}/search HTTP/1.1\r\nHost: x\r\nX-API-Key: {hostile.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        started = time.monotonic()
        conn.settimeout(0.5)
        answer = b""
        for byte in body:
            try:
                conn.sendall(bytes([byte]))
                received = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            answer += received
            if not received or b"}" in answer:
                break
        elapsed = time.monotonic() - started
        conn.settimeout(5)
        while b"}" not in answer and (more := conn.recv(65536)):
            answer += more
    status_line, _, rest = answer.decode("latin-1").partition("\r\n")
    assert status_line == "HTTP/1.1 408 Request Timeout"
    assert "connection: close" in rest.lower()
    assert PROBLEM + "request-timeout" in rest
    assert BODY_SECONDS <= elapsed <= BODY_SECONDS + 1.5
