"""The scaled-out deployment, run for real on loopback: PostgreSQL, `chroma run` and
`redis-server`, two API processes that only queue (RAGAPI_INGEST_WORKERS=0) and two
`ragapi worker` processes, each process with a data directory of its own, as separate machines
would have. The originals live in the registry (registry://), so no process needs another's
disk. Every process is started with the commands and variables of the README's Deployment
section, read from it; only what is this machine's (addresses, ports, data directories) and
the test's own settings (small chunks, logs, rate limits) are put in place of its values.

One test, in steps, because each step needs the state the one before left:
1. every process started at once on a fresh PostgreSQL, several times: no crash (the
   migrations run once, under PostgreSQL's advisory lock, or by `ragapi db upgrade` before
   the start, as the README deploys);
2. a key's rate-limit budget is shared by both API processes (counted in Redis);
3. concurrent ingests through both APIs, the same file twice at the same moment among them:
   one document;
4. a worker killed with SIGKILL mid-job: the other one reclaims the job when its lease runs
   out (default lease), finishes it well under a minute later, and logs the reclaim;
5. SIGTERM to the workers mid-job: each exits within its stop time, giving its job back;
6. Redis stopped: every authenticated request to either API is a 503 dependency-unavailable
   with Retry-After, and both APIs' readiness names rate_limit_storage as down; Redis started
   again on its port: both serve again, not restarted, and each logged the outage once;
7. every process and server restarted: every document, chunk, vector and original is still
   there, the registry's counts equal Chroma's, every document is found by its question, and
   none twice; the interrupted job finishes;
8. metrics add up across processes: the workers' embedded chunks are the chunks indexed, the
   APIs' ingest counts are the ingests sent.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any

import chromadb
import httpx
import psycopg
import pytest

from impl.db import SCHEMA_HEAD
from impl.rag.store import collection_name
from impl.settings import Settings
from tests.conftest import (
    ROOT,
    UNLIMITED,
    Postgres,
    Server,
    chroma_server,
    free_port,
    redis_server,
    wait_until_ready,
)
from tests.documents import CORPUS

API = "/api/v1"
TENANT = "default"
START_ROUNDS = 3
# The default lease (RAGAPI_JOB_LEASE_SECONDS): a dead worker's job is another's this long
# after its last heartbeat, plus a heartbeat's interval at most.
LEASE_SECONDS = 20.0
STOP_SECONDS = 15.0  # RAGAPI_WORKER_STOP_SECONDS' default
START_SECONDS = 180.0


@dataclass(frozen=True)
class Command:
    """One command of the README's recipe: the variables set on its line, and its arguments
    after `ragapi`."""

    env: dict[str, str]
    args: list[str]


@dataclass(frozen=True)
class Recipe:
    """The README's Deployment commands, which this test runs: `shared` is what every process
    exports, `commands` the ragapi commands by their arguments ("db upgrade", "serve", ...)."""

    shared: dict[str, str]
    commands: dict[str, Command]

    @classmethod
    def from_readme(cls) -> Recipe:
        section = (ROOT / "README.md").read_text().split("\n## Deployment\n")[1]
        block = section.split("```sh\n")[1].split("```")[0]
        shared: dict[str, str] = {}
        commands: dict[str, Command] = {}
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["export"]:
                name, value = words[1].split("=", 1)
                shared[name] = value
            elif words:
                assignments = takewhile(lambda word: re.fullmatch(r"\w+=.*", word), words)
                env = dict(word.split("=", 1) for word in assignments)
                program, *args = words[len(env) :]
                assert program == "ragapi", line
                commands[" ".join(args)] = Command(env, args)
        return cls(shared, commands)

    def process(self, command: str, settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of `command`, `settings` put in place of the
        README's values where they are this machine's (addresses, ports, data directory)."""
        given = self.commands[command]
        env = {
            **os.environ,
            **self.shared,
            **given.env,
            **{f"RAGAPI_{name.upper()}": value for name, value in settings.items()},
        }
        return [sys.executable, "-m", "impl.cli", *given.args], env


RECIPE = Recipe.from_readme()


def ledger(name: str, lines: int) -> str:
    """A long document of small chunks: many embedding batches, so a kill lands mid-job."""
    return " ".join(
        f"Line {i} of the {name} ledger notes that crate {i} weighs {i % 17} kilograms."
        for i in range(lines)
    )


@dataclass
class Worker:
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> float:
        """Signal the worker; how long it took to exit."""
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=timeout)
        return time.monotonic() - started


def launch(
    command: str, data_dir: Path, settings: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    """The README's `ragapi <command>`, started with a data directory of its own."""
    argv, env = RECIPE.process(command, {**settings, "data_dir": str(data_dir)})
    log = data_dir.parent / f"{data_dir.name}-{command}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return process, log


def launch_api(data_dir: Path, settings: dict[str, str]) -> Server:
    port = free_port()
    process, log = launch("serve", data_dir, {**settings, "host": "127.0.0.1", "port": str(port)})
    return Server(f"http://127.0.0.1:{port}", data_dir, process, log)


def launch_worker(data_dir: Path, settings: dict[str, str]) -> Worker:
    port = free_port()
    process, log = launch("worker", data_dir, {**settings, "worker_port": str(port)})
    return Worker(data_dir, port, process, log)


def wait_until_live(worker: Worker) -> Worker:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.process.returncode}:\n{read(worker)}")
        try:
            if httpx.get(f"{worker.url}/health", timeout=15).status_code == 200:
                return worker
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    worker.stop(signal.SIGKILL)
    raise RuntimeError(f"worker did not become live:\n{read(worker)}")


def read(process: Worker | Server) -> str:
    return process.log.read_text(errors="replace")


@dataclass
class Topology:
    apis: list[Server]
    workers: list[Worker]

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        for api in self.apis:
            api.stop()


class Deployment:
    """The servers and the settings every ragapi process of the deployment shares."""

    def __init__(self, root: Path, postgres: Postgres, chroma_url: str, redis_url: str):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.postgres = postgres
        self.chroma_url = chroma_url
        self.redis_url = redis_url
        self.database = postgres.create_database()

    def settings(self, **extra: str) -> dict[str, str]:
        """The stores' loopback addresses in place of the README's, and this test's own
        settings; the rest is the README's."""
        return {
            "registry_url": self.postgres.url(self.database),
            "chroma_url": self.chroma_url,
            "rate_limit_storage_url": self.redis_url,
            "chunk_tokens": "32",
            "chunk_overlap_tokens": "0",
            "log_level": "info",
            **UNLIMITED,
            **extra,
        }

    def start(self, **extra: str) -> Topology:
        """Two APIs and two workers, started at once, each with its own data directory."""
        apis = [launch_api(self.root / f"api-{n}", self.settings(**extra)) for n in (1, 2)]
        workers = [launch_worker(self.root / f"worker-{n}", self.settings(**extra)) for n in (1, 2)]
        # Four processes loading the model at once take a while on a small machine.
        for api in apis:
            wait_until_ready(api, timeout=START_SECONDS)
        for worker in workers:
            wait_until_live(worker)
        return Topology(apis, workers)

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(
            f"host=127.0.0.1 port={self.postgres.port} user=ragapi dbname={self.database}"
        ) as connection:
            return list(connection.execute(statement.encode(), params).fetchall())


class Redis:
    """redis-server on a port of its own, which it keeps when stopped and started again."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.running = ExitStack()

    def start(self) -> None:
        self.running.enter_context(redis_server(self.folder, self.port))

    def stop(self) -> None:
        self.running.close()


@contextmanager
def servers(folder: Path) -> Iterator[tuple[str, Redis]]:
    """Chroma and Redis; entered again on the same folder, Chroma finds its data."""
    for name in ("chroma", "redis"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    redis = Redis(folder / "redis")
    with chroma_server(folder / "chroma") as chroma, redis.running:
        redis.start()
        yield chroma, redis


def metric(text: str, sample: str) -> float:
    """A sample's value, 0 when the process has not reported it."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def get_job(http: httpx.Client, job_id: str) -> dict[str, Any]:
    response = http.get(f"{API}/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def holder(deployment: Deployment, job_id: str, workers: list[Worker]) -> Worker:
    """The worker whose lease the job is under (its owner is host/pid/thread)."""
    [(owner,)] = deployment.sql("SELECT lease_owner FROM jobs WHERE id = %s", job_id)
    pid = int(owner.split("/")[1])
    [found] = [worker for worker in workers if worker.process.pid == pid]
    return found


def ingest(http: httpx.Client, text: str, title: str) -> dict[str, Any]:
    response = http.post(
        f"{API}/ingest", params={"wait": "true"}, json={"text": text, "title": title}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["job"]["status"] == "succeeded", body
    return body


def test_the_readme_gives_the_recipe_this_test_runs() -> None:
    """The topology runs the README's commands; they are the ones the deployment needs, and
    every variable they set is a setting ragapi reads."""
    assert set(RECIPE.commands) == {"db upgrade", "serve", "worker"}
    assert set(RECIPE.shared) == {
        "RAGAPI_REGISTRY_URL",
        "RAGAPI_CHROMA_URL",
        "RAGAPI_RATE_LIMIT_STORAGE_URL",
        "RAGAPI_ORIGINALS_URL",
    }
    assert RECIPE.shared["RAGAPI_REGISTRY_URL"].startswith("postgresql+psycopg://")
    assert RECIPE.shared["RAGAPI_ORIGINALS_URL"] == "registry://"  # every machine reads them
    assert RECIPE.commands["serve"].env["RAGAPI_INGEST_WORKERS"] == "0"
    settings = {f"RAGAPI_{name.upper()}" for name in Settings.model_fields}
    named = set(RECIPE.shared).union(*(c.env for c in RECIPE.commands.values()))
    assert named <= settings, named - settings


# About 2 minutes of CPU in all (sixteen process starts, each loading the model); the suite's
# 600 s guard is too tight for that on a machine shared with other work.
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_scaled_out_deployment(tmp_path: Path, postgres: Postgres) -> None:
    with ExitStack() as stack:
        chroma_url, redis = stack.enter_context(servers(tmp_path / "servers"))

        # 1. Every process at once on a fresh PostgreSQL, each electing itself to migrate;
        # then as the README deploys: `ragapi db upgrade`, and every process at once.
        for round_number in range(1, START_ROUNDS + 1):
            deployment = Deployment(
                tmp_path / f"round-{round_number}", postgres, chroma_url, redis.url
            )
            if round_number < START_ROUNDS:
                topology = deployment.start(registry_auto_upgrade="true")
                topology.stop()
                assert all(w.process.returncode == 0 for w in topology.workers)
            else:
                argv, env = RECIPE.process("db upgrade", deployment.settings())
                upgrade = subprocess.run(
                    argv,
                    cwd=ROOT,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert upgrade.returncode == 0, upgrade.stderr
                topology = deployment.start()
        stack.callback(lambda: topology.stop())
        [(revision,)] = deployment.sql("SELECT version_num FROM alembic_version")
        assert revision == SCHEMA_HEAD
        api_a, api_b = topology.apis
        admin_key = next(api.api_key for api in topology.apis if api.api_key)
        a, b = api_a.client(admin_key), api_b.client(admin_key)
        stack.callback(a.close)
        stack.callback(b.close)

        # 2. A key's budget is spent once, whichever API process answers.
        created = a.post(
            f"{API}/keys",
            json={"name": "budget", "scopes": ["read"], "rate_limits": {"read": "10/hour"}},
        )
        assert created.status_code == 201, created.text
        codes = []
        for number in range(14):
            api = topology.apis[number % 2]
            with api.client(created.json()["key"]) as limited:
                codes.append(limited.get(f"{API}/documents").status_code)
        assert codes.count(200) == 10 and codes.count(429) == 4, codes

        # 3. Concurrent ingests through both APIs; the same file twice at the same moment.
        together = threading.Barrier(2)
        saturn = CORPUS["saturn"]

        def send(number: int, key: str) -> dict[str, Any]:
            http = (a, b)[number % 2]
            document = CORPUS[key]
            if key == "saturn":
                together.wait(timeout=30)
            return ingest(http, "\n\n".join(document.paragraphs), document.title)

        order = [*CORPUS, "saturn"]
        with ThreadPoolExecutor(len(order)) as pool:
            answers = list(pool.map(send, range(len(order)), order))
        documents = {
            key: answer["documents"][0]["id"] for key, answer in zip(order, answers, strict=True)
        }
        saturn_ids = {
            answers[i]["documents"][0]["id"] for i, key in enumerate(order) if key == "saturn"
        }
        assert len(saturn_ids) == 1, "the same file sent twice at once made two documents"
        listed = a.get(f"{API}/documents", params={"limit": 100}).json()["items"]
        assert len(listed) == len(CORPUS)
        assert search_finds(b, saturn.question) == documents["saturn"]

        # 4. SIGKILL the worker holding a job: the other one finishes it.
        accepted = a.post(
            f"{API}/ingest", json={"text": ledger("harbour", 400), "title": "Harbour"}
        )
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job"]["id"]
        wait_for(lambda: get_job(b, job_id)["chunks_done"] > 0, 120, "the job started")
        victim = holder(deployment, job_id, topology.workers)
        victim.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        [survivor] = [w for w in topology.workers if w is not victim]
        finished = wait_for(
            lambda: (job := get_job(b, job_id))["status"] in ("succeeded", "failed") and job,
            120,
            "the killed worker's job finished",
        )
        took = time.monotonic() - killed_at
        assert finished["status"] == "succeeded", finished
        assert finished["chunks_done"] == finished["chunks_total"]
        assert took < 60, f"the killed worker's job took {took:.0f} s to finish"
        survivor_log = read(survivor)
        assert re.search(
            rf'"message": "job {job_id} reclaimed: its worker \S+/{victim.process.pid}/',
            survivor_log,
        )
        assert re.search(rf'"message": "job {job_id} claimed by \S+ \(attempt 2\)"', survivor_log)
        harbour = finished["document_ids"][0]
        topology.workers[topology.workers.index(victim)] = wait_until_live(
            launch_worker(victim.data_dir, deployment.settings())
        )

        # 5. SIGTERM mid-job: the worker gives the job back within its stop time.
        accepted = b.post(
            f"{API}/ingest", json={"text": ledger("granary", 400), "title": "Granary"}
        )
        interrupted_job = accepted.json()["job"]["id"]
        wait_for(lambda: get_job(a, interrupted_job)["chunks_done"] > 0, 120, "the job started")
        stopping = holder(deployment, interrupted_job, topology.workers)
        assert stopping.stop(signal.SIGTERM) < STOP_SECONDS + 10
        assert stopping.process.returncode == 0, read(stopping)
        assert f"job {interrupted_job} given back at shutdown" in read(stopping)

        # 6. Redis stopped: both APIs answer 503 dependency-unavailable, and their readiness
        # names it; started again on its port, both serve again with no restart.
        redis.stop()
        for http in (a, b):
            for response in (
                http.get(f"{API}/documents"),
                http.post(f"{API}/search", json={"query": saturn.question}),
            ):
                assert_unavailable(response)
        down = (503, {"rate_limit_storage": "down"})
        assert [readiness(api) for api in topology.apis] == [down, down]
        redis.start()
        assert [readiness(api) for api in topology.apis] == [(200, {}), (200, {})]
        for http in (a, b):
            assert search_finds(http, saturn.question) == documents["saturn"]
        for api in topology.apis:
            outage = [line for line in read(api).splitlines() if f"storage {redis.url}" in line]
            assert [("unreachable" in line, "reachable again" in line) for line in outage] == [
                (True, False),
                (False, True),
            ], outage

        # 7. Restart every process and server.
        topology.stop()
        assert all(w.process.returncode == 0 for w in topology.workers)
        # The other worker may have finished the job given back at shutdown before the restart
        # (ingestion is quick); the metrics below count only what the restarted processes did.
        [(given_back,)] = deployment.sql("SELECT status FROM jobs WHERE id = %s", interrupted_job)
        a.close()
        b.close()
        stack.close()
        postgres.restart()
        before_restart_ready = {key: documents[key] for key in CORPUS} | {"harbour": harbour}
        with ExitStack() as restarted:
            chroma_url, redis = restarted.enter_context(servers(tmp_path / "servers"))
            deployment.chroma_url, deployment.redis_url = chroma_url, redis.url
            topology = deployment.start()
            restarted.callback(topology.stop)
            api_a, api_b = topology.apis
            a, b = api_a.client(admin_key), api_b.client(admin_key)
            restarted.callback(a.close)
            restarted.callback(b.close)

            granary = wait_for(
                lambda: (job := get_job(a, interrupted_job))["status"] == "succeeded" and job,
                180,
                "the job given back at shutdown finished",
            )["document_ids"][0]

            # 8. Metrics add up across processes, counted from the restart on.
            fresh = [
                ingest(http, ledger(name, 40), name.title())["documents"][0]["id"]
                for http, name in ((a, "quarry"), (b, "orchard"))
            ]
            since_restart = fresh if given_back == "succeeded" else [granary, *fresh]
            expected_chunks = sum(
                a.get(f"{API}/documents/{doc}").json()["chunk_count"] for doc in since_restart
            )
            worker_metrics = [httpx.get(f"{w.url}/metrics").text for w in topology.workers]
            assert (
                sum(metric(m, "ragapi_chunks_embedded_total") for m in worker_metrics)
                == expected_chunks
            )
            assert (
                sum(
                    metric(m, 'ragapi_ingest_job_events_total{event="succeeded"}')
                    for m in worker_metrics
                )
                == len(since_restart)  # a job each
            )
            api_metrics = [http.get(f"{API}/metrics").text for http in (a, b)]
            ingests = 'ragapi_requests_total{operation="ingestDocuments",status="200"}'
            assert [metric(m, ingests) for m in api_metrics] == [1, 1]

            # Everything held, once, in every store.
            held = {
                **before_restart_ready,
                "granary": granary,
                "quarry": fresh[0],
                "orchard": fresh[1],
            }
            assert_every_store_agrees(deployment, a, chroma_url, held)
            for key in CORPUS:
                assert search_finds(b, CORPUS[key].question) == held[key], key
            assert search_finds(a, "crate 7 of the granary ledger") == granary


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == "urn:ragapi:problem:dependency-unavailable"
    assert int(response.headers["retry-after"]) > 0


def readiness(api: Server) -> tuple[int, dict[str, str]]:
    """The readiness status code and the state of each component it does not call up."""
    response = httpx.get(f"{api.url}{API}/health/ready", timeout=30)
    components: dict[str, str] = response.json()["components"]
    not_up = {name: state for name, state in components.items() if state != "up"}
    return response.status_code, not_up


def search_finds(http: httpx.Client, question: str) -> str:
    """The document of the best hit; no chunk listed twice."""
    results = http.post(f"{API}/search", json={"query": question, "top_k": 10}).json()["results"]
    chunk_ids = [r["chunk_id"] for r in results]
    assert len(chunk_ids) == len(set(chunk_ids))
    found: str = results[0]["document_id"]
    return found


def assert_every_store_agrees(
    deployment: Deployment, http: httpx.Client, chroma_url: str, held: dict[str, str]
) -> None:
    listed = http.get(f"{API}/documents", params={"limit": 100}).json()["items"]
    assert {d["id"] for d in listed} == set(held.values())
    assert all(d["status"] == "ready" and d["chunk_count"] > 0 for d in listed)
    assert len({d["sha256"] for d in listed}) == len(listed)
    registry_chunks = sum(d["chunk_count"] for d in listed)
    [(chunk_rows,)] = deployment.sql("SELECT count(*) FROM chunks")
    host, port = chroma_url.removeprefix("http://").split(":")
    client = chromadb.HttpClient(host=host, port=int(port))
    vectors = client.get_collection(collection_name(TENANT)).count()
    assert registry_chunks == chunk_rows == vectors
    missing = deployment.sql(
        "SELECT d.id FROM documents d WHERE NOT EXISTS (SELECT 1 FROM originals o WHERE "
        "o.key = d.original_key) OR NOT EXISTS (SELECT 1 FROM originals o WHERE "
        "o.key = d.extracted_key)"
    )
    assert missing == []
    [(stored,)] = deployment.sql("SELECT count(*) FROM originals")
    assert stored == 2 * len(listed)  # no original without its document
