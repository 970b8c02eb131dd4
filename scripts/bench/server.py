"""Servers under test, each its own process on a free loopback port: ``ragapi serve`` exactly as
a user starts it, and the same app without its middleware (bare_app.py)."""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
TENANT = "default"  # the tenant of the bootstrap admin key, and the one the seeding fills
# Budgets no benchmark reaches, so the limiter counts every request but refuses none.
UNLIMITED = {f"RAGAPI_RATE_LIMIT_{b}": "1000000/minute" for b in ("READ", "QUERY", "INGEST")}
_ADMIN_KEY_LINE = re.compile(r"^X-API-Key: (rk_\S+)$", re.MULTILINE)
_READY_POLL_SECONDS = 0.02
_START_TIMEOUT_SECONDS = 300  # a 100k store on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    ready_seconds: float  # from the process's start to /api/v1/health/ready answering 200

    def memory_mb(self) -> dict[str, float]:
        """Resident set now (VmRSS) and at its peak (VmHWM), in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024,
        }

    def cpu_seconds(self) -> float:
        """User and system CPU time the server has used so far, with that of the processes it
        started (parse processes, for one): those alive and those it has waited for."""
        return _tree_cpu_seconds(self.process.pid)

    def admin_key(self) -> str | None:
        printed = _ADMIN_KEY_LINE.search(self.log.read_text(errors="replace"))
        return printed.group(1) if printed else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name, or None for a process gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _tree_cpu_seconds(root: int) -> float:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = int(fields[1])
    tree, added = {root}, True
    while added:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        added = bool(children)
    ticks = 0
    for pid in tree:
        if (fields := _stat(pid)) is not None:
            # utime, stime, and the cutime and cstime of children it has waited for.
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _ready(port: int, path: str) -> bool:
    connection = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _start(command: list[str], env: dict[str, str], log: Path, port: int, path: str) -> Server:
    with log.open("ab") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = started + _START_TIMEOUT_SECONDS
    while not _ready(port, path):
        if process.poll() is not None or time.perf_counter() > deadline:
            process.kill()
            raise SystemExit(f"{' '.join(command)} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(_READY_POLL_SECONDS)
    return Server(port, process, log, time.perf_counter() - started)


def _environment(data_dir: Path, port: int) -> dict[str, str]:
    # Logs at info (one access line per request) and metrics are on, as in production.
    env = {**os.environ, **UNLIMITED, "RAGAPI_DATA_DIR": str(data_dir), "RAGAPI_LOG_LEVEL": "info"}
    # The benchmark asks the same 200 questions round after round: remembered question vectors
    # would measure that memory instead of a search, and the raw side has none.
    env["RAGAPI_EMBEDDING_QUERY_CACHE_SIZE"] = "0"
    # One process: the figures are per process, and the bare app is patched into this one.
    env.update(RAGAPI_PORT=str(port), RAGAPI_HOST=HOST, RAGAPI_WORKERS="1")
    return env


def start_ragapi(data_dir: Path, log: Path, settings: dict[str, str] | None = None) -> Server:
    """``ragapi serve`` with authentication on (the default), timed until it is ready;
    ``settings`` are more RAGAPI_ variables."""
    port = free_port()
    command = [sys.executable, "-m", "impl.cli", "serve"]
    env = {**_environment(data_dir, port), **(settings or {})}
    return _start(command, env, log, port, "/api/v1/health/ready")


def start_bare(data_dir: Path, log: Path) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "scripts.bench.bare_app"]
    return _start(command, _environment(data_dir, port), log, port, "/api/v1/health")


def start_chroma(folder: Path) -> Server:
    """A Chroma server (the chromadb package's own ``chroma run``) with its data in ``folder``:
    what several processes need to share one vector store."""
    port = free_port()
    # chromadb installs its `chroma` command beside the interpreter.
    command = [str(Path(sys.executable).parent / "chroma"), "run", "--path", str(folder)]
    command += ["--host", HOST, "--port", str(port)]
    return _start(
        command, dict(os.environ), folder.parent / "chroma.log", port, "/api/v2/heartbeat"
    )


def start_worker(data_dir: Path, log: Path, settings: dict[str, str]) -> Server:
    """``ragapi worker`` with ``settings`` (RAGAPI_ variables), timed until its /health answers
    200: its ingestion threads run."""
    port = free_port()
    env = {**os.environ, "RAGAPI_DATA_DIR": str(data_dir), "RAGAPI_LOG_LEVEL": "info"}
    env.update(settings, RAGAPI_HOST=HOST, RAGAPI_WORKER_PORT=str(port))
    return _start([sys.executable, "-m", "impl.cli", "worker"], env, log, port, "/health")
