"""Fixtures shared by every test module: a real ragapi server on a free loopback port."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


UNLIMITED = {f"rate_limit_{b}": "1000000/minute" for b in ("read", "query", "ingest")}
ADMIN_KEY_LINE = re.compile(r"^X-API-Key: (rk_\S+)$", re.MULTILINE)


@dataclass
class Server:
    url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    api_key: str = ""  # the admin key the server printed on its first start

    def client(self, key: str | None = None) -> httpx.Client:
        """An HTTP client sending `key`, or the admin key when none is given."""
        headers = {"X-API-Key": key or self.api_key}
        return httpx.Client(base_url=self.url, timeout=120, headers=headers)

    def stop(self, sig: int | None = None) -> None:
        if self.process.poll() is None:
            if sig is None:
                self.process.terminate()
            else:
                self.process.send_signal(sig)
            self.process.wait(timeout=60)


def start_server(data_dir: Path, **settings: str) -> Server:
    """`ragapi serve` in its own process, as a user starts it; RAGAPI_* settings by env."""
    return wait_until_ready(launch_server(data_dir, **settings))


def launch_server(data_dir: Path, **settings: str) -> Server:
    """`ragapi serve` started, not yet waited for (several can then start at once)."""
    port = free_port()
    env = {**os.environ, "RAGAPI_DATA_DIR": str(data_dir), "RAGAPI_LOG_LEVEL": "warning"}
    env.update({f"RAGAPI_{k.upper()}": v for k, v in settings.items()})
    log = data_dir.parent / f"{data_dir.name}-server.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "impl.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Server(f"http://127.0.0.1:{port}", data_dir, process, log)


def wait_until_ready(server: Server, timeout: float = 90) -> Server:
    process, log = server.process, server.log
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            # A generous timeout: the readiness check embeds a query, and a probe given up
            # on while a busy machine computes it would only pile more of them onto it.
            if httpx.get(f"{server.url}/api/v1/health/ready", timeout=15).status_code == 200:
                printed = ADMIN_KEY_LINE.search(log.read_text())
                server.api_key = printed.group(1) if printed else ""
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server did not become ready:\n{log.read_text()}")


def create_key(server: Server, tenant: str, scopes: str, name: str = "test") -> str:
    """A key made with the CLI on the server's own registry, as an operator would."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "impl.cli",
            "keys",
            "create",
            "--name",
            name,
            "--scopes",
            scopes,
            "--tenant",
            tenant,
        ],
        cwd=ROOT,
        env={**os.environ, "RAGAPI_DATA_DIR": str(server.data_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    printed = ADMIN_KEY_LINE.search(result.stdout)
    assert printed, result.stdout + result.stderr
    return printed.group(1)


@pytest.fixture(autouse=True)
def main_module_kept() -> Iterator[None]:
    """Streamlit's AppTest runs ui/app.py as ``__main__`` and leaves it there. A forkserver
    started after that (the parser processes of a service a later test builds) would run
    ui/app.py in every child it starts, which fails there: put the real ``__main__`` back."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the session's HTTP tests, with a small body limit so 413 is cheap and
    budgets no test run reaches (rate limiting has tests of its own)."""
    running = start_server(
        tmp_path_factory.mktemp("server") / "data",
        max_upload_bytes=str(2 * 1024 * 1024),
        log_level="info",
        **UNLIMITED,
    )
    yield running
    running.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


@contextmanager
def chroma_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """A real Chroma server (the chromadb package's own `chroma run`) on `port` or a free one,
    its data in `folder` (so a second one on the same folder and port is the first restarted)."""
    # chromadb installs its `chroma` command beside the interpreter running the tests.
    executable = str(Path(sys.executable).parent / "chroma")
    port = port or free_port()
    with (folder / "chroma.log").open("ab") as log:
        process = subprocess.Popen(
            [executable, "run", "--path", str(folder / "data"), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/api/v2/heartbeat", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("chroma run did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def redis_server(folder: Path, port: int | None = None) -> Iterator[str]:
    """A real redis-server (Debian's; .ci/run installs it) on `port` or a free one, nothing
    persisted."""
    port = port or free_port()
    with (folder / "redis.log").open("ab") as log:
        process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--dir",
                str(folder),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the session's multi-worker ragapi servers' rate limits."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def chroma_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Chroma server for the session's ragapi servers (all with the packaged model)."""
    with chroma_server(tmp_path_factory.mktemp("chroma")) as url:
        yield url


def postgres_bin(program: str) -> str:
    """Debian's PostgreSQL programs (.ci/run installs the package), newest version first."""
    found = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{program}"),
        key=lambda path: int(path.parts[-3]) if path.parts[-3].isdigit() else 0,
    )
    if not found:
        raise RuntimeError(f"{program} not found: install Debian's postgresql package")
    return str(found[-1])


def as_postgres_user(command: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Postgres:
    """A PostgreSQL cluster of the test session's own; each test gets a fresh database."""

    port: int
    pg_ctl: list[str]  # pg_ctl -D <data> -o <options> -l <log>, run as the postgres user

    def restart(self) -> None:
        """Stop the server, dropping every connection, and start it again."""
        subprocess.run(
            [*self.pg_ctl, "-m", "fast", "-w", "restart"], check=True, capture_output=True
        )

    def stop(self) -> None:
        subprocess.run([*self.pg_ctl, "-m", "fast", "-w", "stop"], check=True, capture_output=True)

    def start(self) -> None:
        subprocess.run([*self.pg_ctl, "-w", "start"], check=True, capture_output=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://ragapi@127.0.0.1:{self.port}/{database}"

    def execute(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=ragapi dbname=postgres", autocommit=True
        ) as connection:
            connection.execute(statement.encode())

    def create_database(self) -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        self.execute(f"CREATE DATABASE {name}")
        return name


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """initdb and pg_ctl on a free loopback port in a temporary folder (not pytest's: the
    postgres user must be able to enter it), fsync off: the tests' data need not survive."""
    folder = Path(tempfile.mkdtemp(prefix="ragapi-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data = folder / "data"
    port = free_port()
    subprocess.run(
        as_postgres_user(
            [postgres_bin("initdb"), "-D", str(data), "-U", "ragapi", "-A", "trust", "--no-sync"]
        ),
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = folder / "postgres.log"
    pg_ctl = as_postgres_user(
        [postgres_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(log)]
    )
    subprocess.run([*pg_ctl, "-w", "start"], check=True, capture_output=True, timeout=120)
    try:
        yield Postgres(port, pg_ctl)
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres: Postgres) -> Iterator[str]:
    """The URL of a new, empty database in the session's cluster."""
    name = postgres.create_database()
    yield postgres.url(name)
    postgres.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty registry database: SQLite in the test's folder, or PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
