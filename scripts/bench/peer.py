"""Ingestion CPU per document: ragapi against the naive LangChain tutorial stack
(peer_langchain.py, in a virtualenv of its own) on the same real documents, in one run (issue 13).

The documents are the 31 HTML pages of the SQLite documentation in eval/sqlite-doc (copied from
Debian's sqlite3-doc package). Each side is a fresh server on an empty data dir, sent every page
over HTTP (at most 20 files a request), and charged the CPU time of its whole process tree while
it ingests: the server, and for ragapi its parser processes (forkserver children). Rounds
alternate which side goes first, so that whatever else runs on the machine falls on both.
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from scripts.bench.client import Connection, Response, multipart
from scripts.bench.server import HOST, ROOT, Server, _start, free_port, start_ragapi

DOCUMENTS = ROOT / "eval" / "sqlite-doc"
_FILES_PER_REQUEST = 20  # ragapi's max_files_per_request


def tree_cpu_seconds(root: int) -> float:
    """User and system CPU of ``root`` and every process below it, those it has reaped
    included."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile: its parent's cutime has it
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    children: defaultdict[int, list[int]] = defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack += children[pid]
    return total / os.sysconf("SC_CLK_TCK")


def start_peer(python: Path, data_dir: Path, log: Path) -> Server:
    port = free_port()
    env = {**os.environ, "PEER_DATA_DIR": str(data_dir), "PEER_PORT": str(port)}
    env.pop("PYTHONPATH", None)  # its own virtualenv, none of ragapi's modules
    command = [str(python), str(ROOT / "scripts" / "bench" / "peer_langchain.py")]
    return _start(command, env, log, port, "/health")


def _post(server: Server, path: str, files: list[tuple[str, bytes]], key: str | None) -> Any:
    """POST ``files`` as multipart to ``path``; the answer's JSON."""
    body, content_type = multipart(files)
    headers = {"X-API-Key": key} if key else {}

    async def call() -> Response:
        connection = Connection(HOST, server.port, headers)
        try:
            return await connection.request("POST", path, body, content_type)
        finally:
            await connection.close()

    response = asyncio.run(call())
    if response.status != 200:
        raise SystemExit(f"{path} answered {response.status}: {response.body[:500]!r}")
    return response.json()


def ingestion_cpu(python: Path, work: Path, rounds: int) -> dict[str, Any]:
    """CPU-seconds per document of each side, summed over ``rounds`` fresh servers each."""
    work.mkdir(parents=True, exist_ok=True)
    files = [(path.name, path.read_bytes()) for path in sorted(DOCUMENTS.glob("*.html"))]
    batches = [
        files[start : start + _FILES_PER_REQUEST]
        for start in range(0, len(files), _FILES_PER_REQUEST)
    ]
    sides: dict[str, dict[str, float]] = {
        side: {"cpu_s": 0.0, "documents": 0, "chunks": 0} for side in ("ragapi", "peer")
    }

    def ragapi(number: int) -> None:
        server = start_ragapi(work / f"ragapi-{number}", work / f"ragapi-{number}.log")
        try:
            key = server.admin_key()
            if key is None:
                raise SystemExit(f"the server printed no admin key; see {server.log}")
            before = tree_cpu_seconds(server.process.pid)
            for batch in batches:
                job = _post(server, "/api/v1/ingest?wait=true", batch, key)["job"]
                if job["status"] != "succeeded":
                    raise SystemExit(f"ingestion job ended {job['status']}: {job['error']}")
                sides["ragapi"]["chunks"] += job["chunks_total"]
            sides["ragapi"]["cpu_s"] += tree_cpu_seconds(server.process.pid) - before
            sides["ragapi"]["documents"] += len(files)
        finally:
            server.stop()

    def peer(number: int) -> None:
        server = start_peer(python, work / f"peer-{number}", work / f"peer-{number}.log")
        try:
            before = tree_cpu_seconds(server.process.pid)
            for batch in batches:
                sides["peer"]["chunks"] += _post(server, "/ingest", batch, None)["chunks"]
            sides["peer"]["cpu_s"] += tree_cpu_seconds(server.process.pid) - before
            sides["peer"]["documents"] += len(files)
        finally:
            server.stop()

    for number in range(rounds):
        order = [ragapi, peer] if number % 2 == 0 else [peer, ragapi]
        for side in order:
            side(number)
    per_document = {side: s["cpu_s"] / s["documents"] for side, s in sides.items()}
    return {
        "documents": len(files),
        "bytes": sum(len(content) for _, content in files),
        "rounds": rounds,
        "sides": sides,
        "cpu_s_per_document": per_document,
        "cpu_ratio": per_document["ragapi"] / per_document["peer"],
    }


def main() -> int:
    """Only this block: ``python -m scripts.bench.peer PEER_PYTHON [ROUNDS]``."""
    import json
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ragapi-peer-") as work:
        rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
        results = ingestion_cpu(Path(sys.argv[1]), Path(work), rounds)
    results["load_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
