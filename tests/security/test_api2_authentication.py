"""API2:2023 Broken Authentication: missing, malformed, wrong and revoked keys are 401, the
same way; revocation takes effect on the next request in the process that revoked, and within
key_cache_seconds in every other."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from impl.errors import InvalidInput
from impl.security.keys import KeyStore, SqlKeyStore, VerifiedKeys
from impl.settings import Settings
from tests.conftest import ROOT, Server, create_key

API = "/api/v1"


def assert_unauthenticated(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:ragapi:problem:unauthenticated"
    assert "X-API-Key" in response.headers["www-authenticate"]


def test_every_secured_operation_needs_a_key(server: Server) -> None:
    with httpx.Client(base_url=server.url) as anonymous:
        for method, path in [
            ("GET", "/documents"),
            ("GET", "/documents/doc_x"),
            ("DELETE", "/documents/doc_x"),
            ("GET", "/documents/doc_x/chunks"),
            ("GET", "/jobs/job_x"),
            ("POST", "/search"),
            ("POST", "/query"),
            ("POST", "/ingest"),
            ("GET", "/keys"),
            ("POST", "/keys"),
            ("DELETE", "/keys/key_x"),
            ("GET", "/metrics"),
            ("POST", "/conversations"),
            ("GET", "/conversations"),
            ("GET", "/conversations/conv_x"),
            ("DELETE", "/conversations/conv_x"),
            ("POST", "/conversations/conv_x/messages"),
        ]:
            assert_unauthenticated(anonymous.request(method, f"{API}{path}"))
        # The probes stay open, for load balancers.
        assert anonymous.get(f"{API}/health").status_code == 200
        assert anonymous.get(f"{API}/health/ready").status_code == 200


def test_malformed_and_wrong_keys_are_refused(server: Server) -> None:
    real = server.api_key
    for presented in (
        "",
        "nonsense",
        "rk_",
        "rk__x",
        real[:-1] + ("a" if real[-1] != "a" else "b"),
        real.replace("rk_", "rk_0", 1),
        "Bearer " + real,
        real + "x",
    ):
        with httpx.Client(base_url=server.url, headers={"X-API-Key": presented}) as http:
            assert_unauthenticated(http.get(f"{API}/documents"))


def status_with_raw_key(server: Server, raw_value: bytes) -> int:
    """The status of GET /documents with this X-API-Key value as written on the wire (httpx
    refuses whitespace around a header value)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            f"GET {API}/documents HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
            + b"X-API-Key:"
            + raw_value
            + b"\r\n\r\n"
        )
        answer = b""
        while received := conn.recv(65536):
            answer += received
    return int(answer.split(b" ", 2)[1])


def test_whitespace_around_a_key_is_not_part_of_it(server: Server) -> None:
    # RFC 9110 5.5: whitespace before and after a field value is not part of it; the same rule
    # holds on both sides, and a space inside a key is a different key.
    key = server.api_key.encode()
    for raw in (b" " + key, key + b" ", b"  " + key + b"  ", b"\t" + key + b"\t", b" " + key):
        assert status_with_raw_key(server, raw) == 200, raw
    assert status_with_raw_key(server, b" " + key[:5] + b" " + key[5:]) == 401


def test_a_revoked_key_stops_working_at_once(server: Server) -> None:
    key = create_key(server, "default", "read")
    with server.client(key) as http:
        assert http.get(f"{API}/documents").status_code == 200
        key_id = next(
            k["id"]
            for k in server.client().get(f"{API}/keys").json()["items"]
            if key.startswith(k["prefix"] + "_")
        )
        with server.client() as admin:
            assert admin.delete(f"{API}/keys/{key_id}").status_code == 204
        assert_unauthenticated(http.get(f"{API}/documents"))
        listed = {k["id"]: k for k in server.client().get(f"{API}/keys").json()["items"]}
        assert listed[key_id]["revoked_at"] is not None
        # Revoking it again is no error and changes nothing; a key that never was is a 404.
        with server.client() as admin:
            assert admin.delete(f"{API}/keys/{key_id}").status_code == 204
            again = {k["id"]: k for k in admin.get(f"{API}/keys").json()["items"]}
            assert again[key_id]["revoked_at"] == listed[key_id]["revoked_at"]
            missing = admin.delete(f"{API}/keys/key_{'0' * 32}")
            assert missing.status_code == 404
            assert missing.headers["content-type"] == "application/problem+json"


def test_the_first_start_printed_one_working_admin_key(server: Server) -> None:
    log = server.log.read_text()
    assert log.count("X-API-Key: rk_") == 1
    with server.client() as admin:
        assert admin.get(f"{API}/metrics").status_code == 200


def key_id_of(server: Server, key: str) -> str:
    listed = server.client().get(f"{API}/keys").json()["items"]
    return next(k["id"] for k in listed if key.startswith(k["prefix"] + "_"))


def test_a_key_revoked_by_another_process_stops_working_within_the_cache_time(
    server: Server,
) -> None:
    key = create_key(server, "default", "read")
    key_id = key_id_of(server, key)
    with server.client(key) as http:
        assert http.get(f"{API}/documents").status_code == 200  # now remembered as verified
        subprocess.run(
            [sys.executable, "-m", "impl.cli", "keys", "revoke", key_id],
            cwd=ROOT,
            env={**os.environ, "RAGAPI_DATA_DIR": str(server.data_dir)},
            capture_output=True,
            timeout=60,
            check=True,
        )
        revoked = time.monotonic()
        while http.get(f"{API}/documents").status_code == 200:
            # The server's key_cache_seconds is the default, 5 s.
            assert time.monotonic() - revoked < 5.5, "the revoked key still works"
            time.sleep(0.1)
        assert_unauthenticated(http.get(f"{API}/documents"))


def key_store(registry_url: str, **settings: object) -> KeyStore:
    """A key store on SQLite or PostgreSQL (the registry_url fixture runs a test on both)."""
    return SqlKeyStore(
        Settings(  # type: ignore[call-arg]
            _env_file=None, registry_url=registry_url, registry_auto_upgrade=True, **settings
        )
    )


def test_only_keys_that_verified_are_remembered(registry_url: str) -> None:
    store = key_store(registry_url, key_cache_seconds=60)
    try:
        secret = store.create("t", "k", ["read"]).secret
        wrong = secret[:-4] + "AAAA"
        assert store.verify(wrong) is None
        assert store.recall(wrong) is None and store.recall(secret) is None
        verified = store.verify(secret)
        assert verified is not None and store.recall(secret) == verified
        store.revoke("t", verified.id)
        assert store.recall(secret) is None and store.verify(secret) is None
    finally:
        store.close()


def test_keys_page_newest_first_per_tenant(registry_url: str) -> None:
    store = key_store(registry_url)
    try:
        made = [store.create("t", f"k{i}", ["read"]).key.id for i in range(5)]
        store.create("other", "theirs", ["admin"])
        seen, cursor = [], None
        while True:
            page, cursor = store.list("t", limit=2, cursor=cursor)
            seen.extend(key.id for key in page)
            if cursor is None:
                break
        assert seen == made[::-1]
        assert store.create_first("t", "bootstrap", ["admin"]) is None  # keys exist
        with pytest.raises(InvalidInput):
            store.list("t", limit=2, cursor="not-a-cursor")
    finally:
        store.close()


def test_the_verified_keys_are_bounded_and_expire(tmp_path: Path) -> None:
    store = SqlKeyStore(Settings(_env_file=None, data_dir=tmp_path))
    try:
        keys = [store.create("t", f"k{i}", ["read"]).key for i in range(3)]
    finally:
        store.close()
    small = VerifiedKeys(60, size=2)
    for n, key in enumerate(keys):
        small.put(f"hash{n}", key)
    assert small.get("hash0") is None  # the least recently used went out
    assert (small.get("hash1"), small.get("hash2")) == (keys[1], keys[2])
    brief = VerifiedKeys(0.2)
    brief.put("hash0", keys[0])
    assert brief.get("hash0") == keys[0]
    time.sleep(0.3)
    assert brief.get("hash0") is None
    never = VerifiedKeys(0)
    never.put("hash0", keys[0])
    assert never.get("hash0") is None
