"""Benchmark ragapi against the raw limit of its model and store (issue 5).

    python -m scripts.bench                # 1k, 10k and 100k chunks; see docs/benchmarks.md
    python -m scripts.bench --quick        # 300 chunks, about a minute: the CI smoke test
    python -m scripts.bench --prepare      # only fill the embedding cache
    python -m scripts.bench --sizes 10000  # only these stages (chunks in the store)
    python -m scripts.bench --scaling      # only the worker-scaling block (issue 12)
    python -m scripts.bench --scaling-counts 1,2,4  # worker processes in the scaling block
    python -m scripts.bench --peer-python /tmp/peer-venv/bin/python  # with the LangChain peer

A real ``ragapi serve`` on loopback (authentication, logging and metrics on; rate limits set
out of reach) is measured next to the raw work in this process, in the same run. The table goes
to stdout, every figure to a JSON file (--out; by default under ~/.cache/ragapi-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from impl.rag.embeddings import OnnxMiniLM
from impl.settings import Settings
from scripts.bench import corpus, embedding, measure, peer, report, scaling, seed
from scripts.bench.cache import DEFAULT_DIR, CachedEmbeddings, EmbeddingCache
from scripts.bench.corpus import SourceDocument
from scripts.bench.server import ROOT, Server, start_bare, start_ragapi

_CACHE_CHECKS = 20  # cached vectors embedded again to prove the cache holds the model's output


@dataclass(frozen=True)
class Profile:
    sizes: list[int]  # chunks in the store at each stage
    queries: int  # distinct queries; latency blocks send each once, recall asks each once
    latency_rounds: int
    load_seconds: float  # each concurrency block
    load_rounds: int
    health_seconds: float  # each health block
    health_rounds: int
    ingest_round_bytes: list[int]  # one ingest request per entry
    interference_bytes: int
    idle_seconds: float  # idle searching around the interference ingestion, in all
    embedding_chunks: int  # real 200-token chunks timed for the embedding-efficiency figure
    embedding_rounds: int
    peer_rounds: int  # fresh servers of each side ingesting the 31 pages (with --peer-python)
    scaling_jobs_per_process: int  # ingest requests per worker at each count of the scaling block
    scaling_job_bytes: int  # each of them


FULL = Profile(
    sizes=[1_000, 10_000, 100_000],
    queries=200,
    latency_rounds=3,
    load_seconds=10.0,
    load_rounds=2,
    health_seconds=5.0,
    health_rounds=3,
    ingest_round_bytes=[100_000] * 3,
    interference_bytes=250_000,
    idle_seconds=30.0,
    embedding_chunks=64,
    embedding_rounds=3,
    peer_rounds=2,
    scaling_jobs_per_process=3,
    scaling_job_bytes=60_000,
)
QUICK = Profile(
    sizes=[300],
    queries=20,
    latency_rounds=2,
    load_seconds=1.5,
    load_rounds=1,
    health_seconds=1.5,
    health_rounds=2,
    ingest_round_bytes=[8_000],
    interference_bytes=16_000,
    idle_seconds=3.0,
    embedding_chunks=8,
    embedding_rounds=1,
    peer_rounds=1,
    scaling_jobs_per_process=1,
    scaling_job_bytes=3_000,
)
CONCURRENCY = [1, 8, 32]
HEALTH_CLIENTS = 8


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes, for CI; no cache kept")
    mode.add_argument("--prepare", action="store_true", help="fill the embedding cache, then stop")
    parser.add_argument(
        "--scaling", action="store_true", help="only the worker-scaling block: no store to seed"
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        help="comma-separated stage sizes in chunks, instead of the profile's (e.g. 10000)",
    )
    parser.add_argument(
        "--scaling-counts",
        type=_sizes,
        default=scaling.default_counts(),
        help="comma-separated worker-process counts of the scaling block; default 1, 2, 4, ... "
        "up to the machine's cores",
    )
    parser.add_argument(
        "--peer-python",
        type=Path,
        help="the interpreter of a virtualenv with scripts/bench/peer-requirements.txt: adds "
        "ingestion CPU per document against the naive LangChain stack (peer.py)",
    )
    parser.add_argument("--out", type=Path, help="the JSON file to write")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_DIR, help="the embedding cache")
    parser.add_argument(
        "--work-dir", type=Path, help="data dirs and server logs (kept); default: a temp dir"
    )
    return parser.parse_args(argv)


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of chunk counts: {text!r}") from None
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError("a stage holds at least one chunk")
    return sizes


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _split_by_bytes(
    documents: list[SourceDocument], budgets: list[int]
) -> list[list[SourceDocument]]:
    """Consecutive groups of documents, each of at least its budget's bytes (or as many files
    as one request carries)."""
    remaining = iter(documents)
    groups = []
    for budget in budgets:
        group: list[SourceDocument] = []
        while (
            sum(len(d.content) for d in group) < budget and len(group) < measure.FILES_PER_REQUEST
        ):
            group.append(next(remaining))
        groups.append(group)
    return groups


def _machine() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        ),
        "",
    )
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "commit": commit,
    }


def _check_cache(model: OnnxMiniLM, cache: EmbeddingCache, texts: list[str]) -> float:
    """The lowest cosine between cached vectors and the model's answer now."""
    sample = texts[:: max(1, len(texts) // _CACHE_CHECKS)][:_CACHE_CHECKS]
    cached = np.asarray(cache.get(sample), dtype=np.float32)
    fresh = np.asarray(model.embed_documents(sample), dtype=np.float32)
    return float(np.min(np.sum(cached * fresh, axis=1)))


class Run:
    """One benchmark run: the corpus plan, the model, the cache, and the figures so far."""

    def __init__(self, profile: Profile, args: argparse.Namespace, work: Path) -> None:
        self.profile = profile
        self.data_dir = work / "data"
        self.work = work
        self.results: dict[str, Any] = {
            "command": " ".join(["python -m scripts.bench", *sys.argv[1:]]),
            "mode": "quick" if args.quick else "scaling" if args.scaling else "full",
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "load_before": os.getloadavg(),
            "sizes": profile.sizes,
            "concurrency_levels": CONCURRENCY,
            "profile": asdict(profile),
            "stages": {},
        }
        self.footprint: dict[str, float] = {}
        self.scaling_counts: list[int] = args.scaling_counts
        scaling_budgets = [profile.scaling_job_bytes] * profile.scaling_jobs_per_process
        budgets = [*profile.ingest_round_bytes, profile.interference_bytes, *scaling_budgets]
        _say("reading the corpus")
        self.plan = corpus.plan(
            profile.sizes, profile.queries, sum(budgets) + len(budgets) * corpus.MAX_INGEST_BYTES
        )
        groups = _split_by_bytes(self.plan.ingest, budgets)
        self.scaling_pool = groups[len(groups) - len(scaling_budgets) :]
        *self.ingest_rounds, self.bulk = groups[: len(groups) - len(scaling_budgets)]
        # The model the server runs, with the server's thread setting and a cache folder, so
        # the graph it runs is the one runnable_graph writes.
        self.model = OnnxMiniLM(threads=Settings().embedding_threads, cache_dir=work / "models")
        self.cache = EmbeddingCache(
            work / "cache" if args.quick else args.cache_dir, self.model.model_id
        )
        self.key = ""

    def prepare(self) -> None:
        """Embed what the cache lacks, and prove that it holds what the model answers."""
        texts = self.plan.chunk_texts
        _say(f"cache {self.cache.path}: embedding the chunks it lacks")
        self.results["corpus"] = {
            "seed_chunk_tokens": corpus.SEED_CHUNK_TOKENS,
            "seed_overlap_tokens": corpus.SEED_OVERLAP_TOKENS,
            "seed_documents": len(self.plan.seed),
            "seed_chunk_chars_mean": float(np.mean([len(t) for t in texts])),
            "distinct_chunk_share": len(set(texts)) / len(texts),
            "cache_fill_seconds": self.cache.fill(self.model, texts),
            "cache_check_min_cosine": _check_cache(self.model, self.cache, texts),
            "model_id": self.model.model_id,
        }

    def empty_server(self) -> None:
        """Start-up and memory of a server with nothing stored, and the middleware's cost."""
        _say("empty server: start, idle memory, health against the bare app")
        server = start_ragapi(self.data_dir, self.work / "server.log")
        try:
            key = server.admin_key()
            if key is None:
                raise SystemExit(f"the server printed no admin key; see {server.log}")
            self.key = key
            self.footprint["ready_empty_seconds"] = server.ready_seconds
            self.footprint["rss_idle_mb"] = server.memory_mb()["rss_mb"]
            bare = start_bare(self.work / "bare-data", self.work / "bare.log")
            try:
                self.results["health"] = measure.health(
                    server,
                    bare,
                    HEALTH_CLIENTS,
                    self.profile.health_seconds,
                    self.profile.health_rounds,
                )
            finally:
                bare.stop()
        finally:
            server.stop()

    def stages(self) -> None:
        seeded = 0
        for size in self.profile.sizes:
            _say(f"seeding up to {size} chunks")
            embeddings = CachedEmbeddings(self.model, self.cache)
            upto = self.plan.stage_documents[size]
            seed_seconds = seed.seed(self.data_dir, self.plan.seed[seeded:upto], embeddings)
            seeded = upto
            server = start_ragapi(self.data_dir, self.work / "server.log")
            try:
                stage = self.stage(server, size)
            finally:
                server.stop()
            stage.update(seed_seconds=seed_seconds, cache_misses=embeddings.misses)
            self.results["stages"][str(size)] = stage
        self.results["footprint"] = self.footprint

    def stage(self, server: Server, size: int) -> dict[str, Any]:
        api = measure.Api(server, self.key)
        queries = self.plan.queries
        stage: dict[str, Any] = {
            "ready_seconds": server.ready_seconds,
            "rss_ready_mb": server.memory_mb()["rss_mb"],
            "first_search_ms": measure.first_search_ms(api, queries[0]),
        }
        largest = size == max(self.profile.sizes)
        raw = measure.Raw(self.model, self.data_dir)
        try:
            stage["chunks"] = raw.collection.count()
            stage["hnsw"] = raw.collection.configuration.get("hnsw")
            _say(f"{size} chunks: latency")
            stage["latency"] = measure.latency(api, raw, queries, self.profile.latency_rounds)
            if largest:
                _say(f"{size} chunks: recall")
                self.results["recall"] = measure.recall(api, raw, queries)
                _say(f"{size} chunks: concurrency")
                self.results["concurrency"] = measure.concurrency(
                    api,
                    raw,
                    queries,
                    CONCURRENCY,
                    self.profile.load_seconds,
                    self.profile.load_rounds,
                )
        finally:
            # The server writes from here on: this process stops reading its files first.
            raw.close()
        if largest:
            self.footprint["ready_seconds"] = server.ready_seconds
            self.footprint["rss_loaded_mb"] = server.memory_mb()["rss_mb"]
            _say(f"{size} chunks: ingestion")
            self.results["ingestion"] = measure.ingestion(api, self.model, self.ingest_rounds)
            _say(f"{size} chunks: search during ingestion")
            self.results["interference"] = measure.interference(
                api, queries, self.bulk, self.profile.idle_seconds
            )
            self.footprint["peak_rss_mb"] = server.memory_mb()["peak_rss_mb"]
        return stage


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    profile = QUICK if args.quick else FULL
    if args.sizes:
        profile = replace(profile, sizes=args.sizes)
    if args.scaling:
        profile = replace(profile, sizes=[])
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ragapi-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        run = Run(profile, args, work)
        if not args.scaling:
            run.prepare()
            if args.prepare:
                _say(f"cache ready: {json.dumps(run.results['corpus'])}")
                return 0
            _say("embedding efficiency")
            run.results["embedding"] = embedding.efficiency(
                run.model, profile.embedding_chunks, profile.embedding_rounds
            )
            run.empty_server()
            run.stages()
            if args.peer_python:
                _say("ingestion CPU per document against the LangChain peer")
                run.results["peer"] = peer.ingestion_cpu(
                    args.peer_python, work / "peer", profile.peer_rounds
                )
        run.results["scaling"] = scaling.worker_scaling(
            work / "scaling",
            run.scaling_counts,
            run.scaling_pool,
            run.plan.queries,
            profile.idle_seconds,
            _say,
        )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results = run.results
    results["load_after"] = os.getloadavg()
    results["seconds"] = time.perf_counter() - started
    checked = report.targets(results)
    results["targets"] = [target.as_json() for target in checked]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or DEFAULT_DIR / "results" / f"bench-{results['mode']}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(report.table(results, checked))
    _say(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
