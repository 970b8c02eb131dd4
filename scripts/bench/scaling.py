"""Ingestion throughput with 1, 2, ... ``ragapi worker`` processes against as many raw embedding
processes, in the same run (issue 12).

The deployment is the scaled-out one on one machine: ``chroma run``, one ``ragapi serve`` that
only queues (RAGAPI_INGEST_WORKERS=0), and N workers, each running one job at a time on one
onnxruntime thread (RAGAPI_INGEST_WORKERS=1, RAGAPI_EMBEDDING_THREADS=1); the registry is
SQLite (WAL) in a data directory they all share. The raw side is N processes embedding the same
chunk texts with the packaged model on one thread each, the work split evenly among them, no
parsing, no stores. Each process loads its model before the clock starts.

Workers count from the first job queued to the last one's end (its ``updated_at``); raw
processes from one start signal to the last one's end. Raw processes run at the workers'
niceness (RAGAPI_WORKER_NICE). Then, with the largest count, one client searches while the
workers ingest more and while as many raw processes embed the same chunks, against the same
client before and after.

    python -m scripts.bench.scaling TEXTS.json   # one raw embedding process (run by the block)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from impl.rag.embeddings import OnnxMiniLM
from impl.rag.jobs import EMBED_BATCH, shared_batches
from impl.rag.loaders import detect_media_type, extract_text
from impl.settings import Settings
from scripts.bench.client import Connection, load
from scripts.bench.corpus import SourceDocument
from scripts.bench.measure import (
    Api,
    percentiles,
    post_ingest,
    ratio,
    search_call,
    server_chunker,
)
from scripts.bench.server import HOST, ROOT, Server, start_chroma, start_ragapi, start_worker

_JOB_POLL_SECONDS = 1.0
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def default_counts() -> list[int]:
    """1, 2, 4, ... up to the machine's cores, and the cores themselves."""
    cores = os.cpu_count() or 1
    counts = [1]
    while counts[-1] * 2 <= cores:
        counts.append(counts[-1] * 2)
    return counts if counts[-1] == cores else [*counts, cores]


def _copies(
    pool: Sequence[Sequence[SourceDocument]], processes: int, label: str
) -> list[list[SourceDocument]]:
    """The pool's ingest requests once per process, every document made a copy of its own by a
    first line naming it (the server would take a second upload of the same bytes for the
    first): each process gets the same work, and the corpus need not hold a new document for
    every job of a run."""
    return [
        [
            SourceDocument(d.name, (f"Copy {label}-{process} of {d.name}.", *d.docstrings))
            for d in group
        ]
        for process in range(processes)
        for group in pool
    ]


def _chunk_texts(jobs: Sequence[Sequence[SourceDocument]]) -> list[list[str]]:
    """Each document's chunks as the server cuts them."""
    chunker, limits = server_chunker()
    texts = []
    for documents in jobs:
        for d in documents:
            media_type = detect_media_type(d.content, d.filename, "application/octet-stream")
            texts.append(
                [span.text for span in chunker.split(extract_text(d.content, media_type, limits))]
            )
    return texts


def _queue(api: Api, jobs: Sequence[Sequence[SourceDocument]]) -> list[str]:
    return [post_ingest(api, documents, wait=False)["id"] for documents in jobs]


def _finished(api: Api, job_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Wait for every job to end; their final states. One job asked at a time, the first not
    yet seen ending, once a second: the timing comes from the jobs' own ``updated_at``, and
    asking more often only adds the API's answers to the CPU the block measures."""

    def state(job_id: str) -> dict[str, Any]:
        async def ask(connection: Connection) -> dict[str, Any]:
            answer: dict[str, Any] = (
                await connection.request("GET", f"/api/v1/jobs/{job_id}")
            ).json()
            return answer

        return api.once(ask)

    ended: list[dict[str, Any]] = []
    for job_id in job_ids:
        while (found := state(job_id))["status"] not in ("succeeded", "failed"):
            time.sleep(_JOB_POLL_SECONDS)
        if found["status"] == "failed":
            raise SystemExit(f"ingestion job failed: {found['error']}")
        ended.append(found)
    return ended


def _workers_block(
    api: Api, jobs: Sequence[Sequence[SourceDocument]], roles: dict[str, Sequence[Server]]
) -> dict[str, Any]:
    """The jobs through the workers, with the CPU seconds each role's processes spent meanwhile
    (api, chroma, workers): what ingestion costs besides embedding, and where."""
    cpu_before = {role: sum(s.cpu_seconds() for s in servers) for role, servers in roles.items()}
    started = time.time()
    states = _finished(api, _queue(api, jobs))
    ended = max(datetime.fromisoformat(s["updated_at"]).timestamp() for s in states)
    chunks = sum(s["chunks_done"] for s in states)
    return {
        "chunks": chunks,
        "seconds": ended - started,
        "chunks_per_s": chunks / (ended - started),
        "cpu_seconds": {
            role: sum(s.cpu_seconds() for s in servers) - cpu_before[role]
            for role, servers in roles.items()
        },
    }


def _raw_block(texts: list[list[str]], processes: int, folder: Path) -> dict[str, float]:
    """``processes`` raw embedders, each with one process's copy of the pool (``texts`` holds
    the copies one after another); all load their model, then start together."""
    children = []
    per_process = len(texts) // processes
    for number in range(processes):
        share = folder / f"raw-{processes}-{number}.json"
        share.write_text(json.dumps(texts[number * per_process : (number + 1) * per_process]))
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "scripts.bench.scaling", str(share)],
                cwd=ROOT,
                env={**os.environ, **_ONE_THREAD},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for child in children:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("a raw embedding process did not start")
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    reports = []
    for child in children:
        out, _ = child.communicate(timeout=3600)
        if child.returncode != 0:
            raise SystemExit(f"a raw embedding process failed ({child.returncode})")
        reports.append(json.loads(out))
    chunks = sum(r["chunks"] for r in reports)
    seconds = max(r["finished"] for r in reports) - min(r["started"] for r in reports)
    return {
        "chunks": chunks,
        "seconds": seconds,
        "chunks_per_s": chunks / seconds,
        "cpu_seconds": sum(r["cpu_seconds"] for r in reports),
    }


def _interference(
    api: Api,
    queries: Sequence[str],
    jobs: Sequence[Sequence[SourceDocument]],
    processes: int,
    work: Path,
    idle_seconds: float,
) -> dict[str, Any]:
    """One client's search p95 while ``processes`` workers ingest ``jobs`` and while as many
    raw embedding processes embed the same chunks, against the idle API before and after. The
    raw side is the floor the machine sets: embedding on the other cores slows the API's own
    CPU work (measured here: a fifth to two fifths more CPU time for SQLite reads beside one
    embedding process, whatever the priorities), which no scheduling of the workers removes."""
    searching = search_call(queries)
    idle = api.load(searching, clients=1, seconds=idle_seconds / 2)

    def during(work_of_others: Any) -> Any:
        done = False

        async def others() -> None:
            nonlocal done
            await asyncio.to_thread(work_of_others)
            done = True

        async def measure() -> Any:
            search = load(
                HOST, api.server.port, api.headers, searching, clients=1, until=lambda: done
            )
            result, _ = await asyncio.gather(search, others())
            return result

        return asyncio.run(measure())

    job_ids = _queue(api, jobs)
    ingesting = during(lambda: _finished(api, job_ids))
    embedding = during(lambda: _raw_block(_chunk_texts(jobs), processes, work))
    after = api.load(searching, clients=1, seconds=idle_seconds / 2)
    idle_p95 = percentiles(idle.latencies_ms + after.latencies_ms)["p95_ms"]
    during_p95 = percentiles(ingesting.latencies_ms)["p95_ms"]
    raw_p95 = percentiles(embedding.latencies_ms)["p95_ms"]
    return {
        "idle_p95_ms": idle_p95,
        "during_p95_ms": during_p95,
        "during_searches": len(ingesting.latencies_ms),
        "raw_during_p95_ms": raw_p95,
        "raw_during_searches": len(embedding.latencies_ms),
        "errors": idle.errors + ingesting.errors + embedding.errors + after.errors,
        "p95_ratio": ratio(during_p95, idle_p95),
        "raw_p95_ratio": ratio(raw_p95, idle_p95),
    }


def worker_scaling(
    work: Path,
    counts: Sequence[int],
    pool: Sequence[Sequence[SourceDocument]],
    queries: Sequence[str],
    idle_seconds: float,
    say: Any,
) -> dict[str, Any]:
    """The block; ``pool`` holds the ingest requests each process gets at each count."""
    work.mkdir(parents=True)
    data_dir = work / "data"
    chroma = start_chroma(work / "chroma")
    servers: list[Server] = [chroma]  # stopped in reverse order
    workers: list[Server] = []
    shared = {"RAGAPI_CHROMA_URL": f"http://{HOST}:{chroma.port}"}
    results: dict[str, Any] = {"jobs_per_process": len(pool), "counts": {}}
    try:
        api_server = start_ragapi(
            data_dir, work / "api.log", {**shared, "RAGAPI_INGEST_WORKERS": "0"}
        )
        servers.append(api_server)
        key = api_server.admin_key()
        if key is None:
            raise SystemExit(f"the server printed no admin key; see {api_server.log}")
        api = Api(api_server, key)
        one_job_each = {**shared, "RAGAPI_INGEST_WORKERS": "1", "RAGAPI_EMBEDDING_THREADS": "1"}
        for round_number, count in enumerate(counts):
            mine = _copies(pool, count, str(count))
            say(f"worker scaling: {count} worker(s) and {count} raw process(es)")
            # The counts ascend: the workers of the last count stay, the missing ones start.
            started = [
                start_worker(data_dir, work / f"worker-{n}.log", {**one_job_each, **_ONE_THREAD})
                for n in range(len(workers), count)
            ]
            workers += started
            servers += started
            texts = _chunk_texts(mine)
            figures: dict[str, Any] = {}
            # Alternating which side goes first, so that a change in load falls on both.
            order = ["workers", "raw"] if round_number % 2 == 0 else ["raw", "workers"]
            for side in order:
                if side == "workers":
                    roles = {"api": [api_server], "chroma": [chroma], "workers": workers}
                    figures["workers"] = _workers_block(api, mine, roles)
                else:
                    figures["raw"] = _raw_block(texts, count, work)
            figures["ratio"] = ratio(
                figures["workers"]["chunks_per_s"], figures["raw"]["chunks_per_s"]
            )
            results["counts"][str(count)] = figures
            if count == max(counts):
                say(f"worker scaling: search while {count} worker(s) ingest")
                results["interference"] = {
                    "workers": count,
                    **_interference(
                        api, queries, _copies(pool, count, "search"), count, work, idle_seconds
                    ),
                }
    finally:
        for server in reversed(servers):
            server.stop()
    by_count = results["counts"]
    results["lowest_ratio"] = min(c["ratio"] for c in by_count.values())
    if "1" in by_count and "2" in by_count:
        one, two = by_count["1"], by_count["2"]
        results["workers_2_over_1"] = ratio(
            two["workers"]["chunks_per_s"], one["workers"]["chunks_per_s"]
        )
        results["raw_2_over_1"] = ratio(two["raw"]["chunks_per_s"], one["raw"]["chunks_per_s"])
    return results


def _raw_process(share: Path) -> None:
    """One raw embedding process: load the model, say so, wait for the start, embed the
    documents' chunks in the batches a worker embeds (small documents together), report."""
    texts: list[list[str]] = json.loads(share.read_text())
    # At the workers' niceness, so that both sides meet the same competition for the CPU.
    settings = Settings()
    os.nice(settings.worker_nice)
    # The graph the workers run: the model as written to their cache folder.
    model = OnnxMiniLM(threads=1, cache_dir=settings.model_cache_dir)
    print("ready", flush=True)
    sys.stdin.readline()
    started, cpu_started = time.time(), time.process_time()
    for batch in shared_batches(texts, len):
        if len(batch) > 1:
            model.embed_documents([text for document in batch for text in document])
            continue
        for start in range(0, len(batch[0]), EMBED_BATCH):
            model.embed_documents(batch[0][start : start + EMBED_BATCH])
    finished = time.time()
    chunks = sum(len(document) for document in texts)
    report = {
        "started": started,
        "finished": finished,
        "chunks": chunks,
        "cpu_seconds": time.process_time() - cpu_started,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    _raw_process(Path(sys.argv[1]))
