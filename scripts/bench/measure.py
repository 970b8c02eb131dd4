"""The measurements. Every HTTP figure has its raw baseline taken in the same run, and the two
run in alternating blocks (their order rotated from round to round), so that what else the
machine does falls on both alike."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import chromadb
import numpy as np

from impl.rag.chunking import Chunker
from impl.rag.embeddings import EmbeddingModel, count_tokens, load_tokenizer
from impl.rag.jobs import EMBED_BATCH
from impl.rag.loaders import ParseLimits, detect_media_type, extract_text
from impl.rag.store import chroma_settings, collection_name
from impl.settings import Settings
from scripts.bench.client import Call, Connection, LoadResult, Response, load, multipart
from scripts.bench.corpus import SourceDocument
from scripts.bench.server import HOST, TENANT, Server

TOP_K = 5
# Scores within this of the k-th best count as tied with it: identical chunks (the corpus has
# a few) have identical vectors, and either of two tied ids is a correct answer.
_TIE = 1e-5
_VECTOR_PAGE = 5000
_JOB_POLL_SECONDS = 0.5
FILES_PER_REQUEST = 20  # max_files_per_request


def percentiles(latencies_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99]) if len(values) else (np.nan,) * 3
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "n": len(values)}


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


class Raw:
    """The raw limit: the server's embedding call and the same Chroma query on the same
    collection, in this process, no HTTP. Opened while the server runs, and used only while it
    idles and writes nothing: two readers of the same files."""

    def __init__(self, model: EmbeddingModel, data_dir: Path) -> None:
        self.model = model
        self._client = chromadb.PersistentClient(
            path=str(data_dir / "chroma"), settings=chroma_settings()
        )
        self.collection = self._client.get_collection(
            collection_name(TENANT), embedding_function=None
        )

    def close(self) -> None:
        self._client.close()

    def search(self, text: str) -> list[str]:
        vector = self.model.embed_query(text)
        found = self.collection.query(
            query_embeddings=np.asarray([vector], dtype=np.float32),
            n_results=TOP_K,
            include=["documents", "metadatas", "distances"],
        )
        return list(found["ids"][0])

    def load(self, queries: Sequence[str], threads: int, seconds: float) -> LoadResult:
        """``threads`` threads searching back to back for ``seconds``."""
        result = LoadResult()
        numbers = itertools.count()
        lock = threading.Lock()
        deadline = time.perf_counter() + seconds

        def work() -> None:
            while time.perf_counter() < deadline:
                query = queries[next(numbers) % len(queries)]
                started = time.perf_counter()
                try:
                    self.search(query)
                except Exception:
                    with lock:
                        result.errors += 1
                    continue
                with lock:
                    result.latencies_ms.append((time.perf_counter() - started) * 1000)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        result.seconds = time.perf_counter() - started
        return result


class Api:
    """The server under test as the benchmark calls it: with the admin key, over loopback."""

    def __init__(self, server: Server, key: str) -> None:
        self.server = server
        self.headers = {"X-API-Key": key}

    def load(self, call: Call, **how: Any) -> LoadResult:
        return asyncio.run(load(HOST, self.server.port, self.headers, call, **how))

    def once(self, call: Callable[[Connection], Any]) -> Any:
        async def run() -> Any:
            connection = Connection(HOST, self.server.port, self.headers)
            try:
                return await call(connection)
            finally:
                await connection.close()

        return asyncio.run(run())


def search_call(queries: Sequence[str], mode: str | None = None) -> Call:
    """POST /search of each query in turn; ``mode`` sets its retrieval mode, None leaves the
    server's default."""
    retrieval = {} if mode is None else {"retrieval": {"mode": mode}}

    async def call(connection: Connection, number: int) -> Response:
        body = {"query": queries[number % len(queries)], "top_k": TOP_K, **retrieval}
        return await connection.post_json("/api/v1/search", body)

    return call


def query_call(queries: Sequence[str]) -> Call:
    async def call(connection: Connection, number: int) -> Response:
        body = {"question": queries[number % len(queries)], "top_k": TOP_K}
        return await connection.post_json("/api/v1/query", body)

    return call


def _rotated(blocks: list[Any], round_number: int) -> list[Any]:
    shift = round_number % len(blocks)
    return blocks[shift:] + blocks[:shift]


def first_search_ms(api: Api, query: str) -> float:
    """The first search after a start: it loads the collection's index."""
    started = time.perf_counter()
    api.load(search_call([query]), clients=1, requests=1)
    return (time.perf_counter() - started) * 1000


# The latency block's POST /search rows: the name of each row and the retrieval mode it asks
# for. "search" is hybrid, the server's default, which every other search of the benchmark uses.
SEARCH_MODES = {"search": "hybrid", "search_dense": "dense", "search_lexical": "lexical"}


def latency(api: Api, raw: Raw, queries: Sequence[str], rounds: int) -> dict[str, Any]:
    """One client at a time: POST /search in each retrieval mode and POST /query (extractive)
    against the raw search, each over every query, in ``rounds`` rotated rounds."""
    warm = queries[: min(10, len(queries))]
    for query in warm:
        raw.search(query)
    for mode in SEARCH_MODES.values():
        api.load(search_call(warm, mode), clients=1, requests=len(warm))
    api.load(query_call(warm), clients=1, requests=len(warm))
    samples: dict[str, list[float]] = {name: [] for name in ("raw_search", *SEARCH_MODES, "query")}
    # CPU seconds spent: by this process in the raw blocks, by the server in the HTTP ones.
    cpu = dict.fromkeys(samples, 0.0)
    errors = 0

    def raw_block() -> None:
        cpu_before = time.process_time()
        for query in queries:
            started = time.perf_counter()
            raw.search(query)
            samples["raw_search"].append((time.perf_counter() - started) * 1000)
        cpu["raw_search"] += time.process_time() - cpu_before

    def http_block(name: str, call: Call) -> Callable[[], None]:
        def run() -> None:
            nonlocal errors
            cpu_before = api.server.cpu_seconds()
            result = api.load(call, clients=1, requests=len(queries))
            cpu[name] += api.server.cpu_seconds() - cpu_before
            samples[name].extend(result.latencies_ms)
            errors += result.errors

        return run

    blocks = [
        raw_block,
        *(http_block(name, search_call(queries, mode)) for name, mode in SEARCH_MODES.items()),
        http_block("query", query_call(queries)),
    ]
    for number in range(rounds):
        for block in _rotated(blocks, number):
            block()
    figures: dict[str, Any] = {name: percentiles(values) for name, values in samples.items()}
    for name, values in samples.items():
        figures[name]["cpu_ms"] = cpu[name] * 1000 / len(values) if values else float("nan")
    raw_p95 = figures["raw_search"]["p95_ms"]
    hybrid, dense = figures["search"], figures["search_dense"]
    return {
        **figures,
        "errors": errors,
        # The server's overhead over the raw work it does: the dense search is the same work as
        # the raw one (embed, then query Chroma); hybrid's extra cost has its own ratio below.
        "search_p95_ratio": ratio(dense["p95_ms"], raw_p95),
        "query_p95_ratio": ratio(figures["query"]["p95_ms"], raw_p95),
        "hybrid_dense_p50_ratio": ratio(hybrid["p50_ms"], dense["p50_ms"]),
        "hybrid_dense_p95_ratio": ratio(hybrid["p95_ms"], dense["p95_ms"]),
        "hybrid_dense_cpu_ratio": ratio(hybrid["cpu_ms"], dense["cpu_ms"]),
    }


def concurrency(
    api: Api, raw: Raw, queries: Sequence[str], levels: Sequence[int], seconds: float, rounds: int
) -> dict[str, Any]:
    """Requests/s, p95 and errors of ``c`` clients searching back to back, against ``c`` threads
    doing the raw work in-process."""
    pooled = {(side, c): LoadResult() for side in ("http", "raw") for c in levels}

    def add(into: LoadResult, result: LoadResult) -> None:
        into.latencies_ms.extend(result.latencies_ms)
        into.errors += result.errors
        into.seconds += result.seconds

    for number in range(rounds):
        for clients in levels:
            blocks = [
                lambda c=clients: add(pooled["raw", c], raw.load(queries, c, seconds)),
                lambda c=clients: add(
                    pooled["http", c],
                    api.load(search_call(queries, "dense"), clients=c, seconds=seconds),
                ),
            ]
            for block in _rotated(blocks, number):
                block()
    figures: dict[str, Any] = {}
    for clients in levels:
        http, direct = pooled["http", clients], pooled["raw", clients]
        figures[str(clients)] = {
            "http_rps": http.rate,
            "http_p95_ms": percentiles(http.latencies_ms)["p95_ms"],
            "http_errors": http.errors,
            "raw_rps": direct.rate,
            "raw_p95_ms": percentiles(direct.latencies_ms)["p95_ms"],
            "raw_errors": direct.errors,
            "rps_ratio": ratio(http.rate, direct.rate),
        }
    return figures


def health(
    full: Server, bare: Server, clients: int, seconds: float, rounds: int
) -> dict[str, float]:
    """GET /api/v1/health requests/s: the full stack against the app without middleware."""
    pooled = {"full": LoadResult(), "bare": LoadResult()}

    async def call(connection: Connection, _number: int) -> Response:
        return await connection.request("GET", "/api/v1/health")

    def block(name: str, server: Server) -> Callable[[], None]:
        def run() -> None:
            result = asyncio.run(
                load(HOST, server.port, {}, call, clients=clients, seconds=seconds)
            )
            pooled[name].latencies_ms.extend(result.latencies_ms)
            pooled[name].errors += result.errors
            pooled[name].seconds += result.seconds

        return run

    blocks = [block("full", full), block("bare", bare)]
    for number in range(rounds):
        for run in _rotated(blocks, number):
            run()
    full_rps, bare_rps = pooled["full"].rate, pooled["bare"].rate
    return {
        "clients": clients,
        "full_rps": full_rps,
        "bare_rps": bare_rps,
        "full_p95_ms": percentiles(pooled["full"].latencies_ms)["p95_ms"],
        "bare_p95_ms": percentiles(pooled["bare"].latencies_ms)["p95_ms"],
        "errors": pooled["full"].errors + pooled["bare"].errors,
        "rps_ratio": ratio(full_rps, bare_rps),
    }


def server_chunker() -> tuple[Chunker, ParseLimits]:
    """The chunker and parse limits of a server on default settings."""
    settings = Settings()
    chunker = Chunker(
        count_tokens=functools.partial(count_tokens, load_tokenizer()),
        chunk_tokens=settings.chunk_tokens,
        overlap_tokens=settings.chunk_overlap_tokens,
    )
    return chunker, ParseLimits.from_settings(settings)


def post_ingest(api: Api, documents: Sequence[SourceDocument], wait: bool) -> dict[str, Any]:
    body, content_type = multipart([(d.filename, d.content) for d in documents])
    path = "/api/v1/ingest?wait=true" if wait else "/api/v1/ingest"

    async def call(connection: Connection) -> Response:
        return await connection.request("POST", path, body, content_type)

    response: Response = api.once(call)
    if response.status not in (200, 202):
        raise SystemExit(f"ingest answered {response.status}: {response.body[:500]!r}")
    job: dict[str, Any] = response.json()["job"]
    if wait and job["status"] != "succeeded":
        raise SystemExit(f"ingestion job ended {job['status']}: {job['error']}")
    return job


def ingestion(
    api: Api, model: EmbeddingModel, rounds: Sequence[Sequence[SourceDocument]]
) -> dict[str, Any]:
    """POST /api/v1/ingest?wait=true against embedding the same chunks in-process, in batches of
    the size an ingestion worker embeds."""
    chunker, limits = server_chunker()
    http = {"chunks": 0, "bytes": 0, "seconds": 0.0}
    raw = {"chunks": 0, "seconds": 0.0}

    def http_block(documents: Sequence[SourceDocument]) -> None:
        started = time.perf_counter()
        job = post_ingest(api, documents, wait=True)
        http["seconds"] += time.perf_counter() - started
        http["chunks"] += job["chunks_total"]
        http["bytes"] += sum(len(d.content) for d in documents)

    def raw_block(documents: Sequence[SourceDocument]) -> None:
        chunked = []
        for d in documents:
            media_type = detect_media_type(d.content, d.filename, "application/octet-stream")
            spans = chunker.split(extract_text(d.content, media_type, limits))
            chunked.append([span.text for span in spans])
        started = time.perf_counter()
        for texts in chunked:  # per document, as a worker embeds them
            for start in range(0, len(texts), EMBED_BATCH):
                model.embed_documents(texts[start : start + EMBED_BATCH])
        raw["seconds"] += time.perf_counter() - started
        raw["chunks"] += sum(len(texts) for texts in chunked)

    for number, documents in enumerate(rounds):
        blocks = [functools.partial(http_block, documents), functools.partial(raw_block, documents)]
        for block in _rotated(blocks, number):
            block()
    http_rate = http["chunks"] / http["seconds"]
    raw_rate = raw["chunks"] / raw["seconds"]
    return {
        "chunks": http["chunks"],
        "raw_chunks": raw["chunks"],
        "mb": http["bytes"] / 1e6,
        "http_chunks_per_s": http_rate,
        "http_mb_per_s": http["bytes"] / 1e6 / http["seconds"],
        "raw_chunks_per_s": raw_rate,
        "chunks_per_s_ratio": ratio(http_rate, raw_rate),
    }


def interference(
    api: Api, queries: Sequence[str], documents: Sequence[SourceDocument], idle_seconds: float
) -> dict[str, Any]:
    """One client searching back to back while a bulk ingestion runs, against the same client
    on the idle server just before and just after."""
    idle = api.load(search_call(queries), clients=1, seconds=idle_seconds / 2)
    jobs = [
        post_ingest(api, documents[start : start + FILES_PER_REQUEST], wait=False)["id"]
        for start in range(0, len(documents), FILES_PER_REQUEST)
    ]
    started = time.perf_counter()

    async def measure() -> tuple[LoadResult, int]:
        finished = False
        chunks = 0

        async def watch() -> None:
            nonlocal finished, chunks
            connection = Connection(HOST, api.server.port, api.headers)
            try:
                while True:
                    states = [
                        (await connection.request("GET", f"/api/v1/jobs/{job}")).json()
                        for job in jobs
                    ]
                    if all(s["status"] in ("succeeded", "failed") for s in states):
                        chunks = sum(s["chunks_done"] for s in states)
                        finished = True
                        return
                    await asyncio.sleep(_JOB_POLL_SECONDS)
            finally:
                await connection.close()

        searching = load(
            HOST,
            api.server.port,
            api.headers,
            search_call(queries),
            clients=1,
            until=lambda: finished,
        )
        during, _ = await asyncio.gather(searching, watch())
        return during, chunks

    during, chunks = asyncio.run(measure())
    ingest_seconds = time.perf_counter() - started
    after = api.load(search_call(queries), clients=1, seconds=idle_seconds / 2)
    idle.latencies_ms += after.latencies_ms
    idle_p95 = percentiles(idle.latencies_ms)["p95_ms"]
    during_p95 = percentiles(during.latencies_ms)["p95_ms"]
    return {
        "idle_p95_ms": idle_p95,
        "during_p95_ms": during_p95,
        "during_searches": len(during.latencies_ms),
        "errors": idle.errors + after.errors + during.errors,
        "ingested_chunks": chunks,
        "ingest_chunks_per_s": chunks / ingest_seconds,
        "p95_ratio": ratio(during_p95, idle_p95),
    }


def recall(api: Api, raw: Raw, queries: Sequence[str]) -> dict[str, Any]:
    """Top-5 of POST /search in dense mode (and of the raw Chroma query) against exact search:
    numpy cosine over every vector in the collection, read back from it. Dense mode, because
    this is the vector index's recall: hybrid's top-5 is meant to differ from the cosine's."""
    ids: list[str] = []
    pages = []
    total = raw.collection.count()
    for offset in range(0, total, _VECTOR_PAGE):
        page = raw.collection.get(include=["embeddings"], limit=_VECTOR_PAGE, offset=offset)
        ids += page["ids"]
        pages.append(np.asarray(page["embeddings"], dtype=np.float32))
    vectors = np.concatenate(pages)
    row = {chunk_id: number for number, chunk_id in enumerate(ids)}
    if len(row) != total:
        raise SystemExit(f"read {len(row)} distinct vectors of {total}")

    async def server_top(connection: Connection, query: str) -> list[str]:
        body = {"query": query, "top_k": TOP_K, "retrieval": {"mode": "dense"}}
        response = await connection.post_json("/api/v1/search", body)
        return [hit["chunk_id"] for hit in response.json()["results"]]

    async def all_server_tops(connection: Connection) -> list[list[str]]:
        return [await server_top(connection, query) for query in queries]

    server_tops = api.once(all_server_tops)
    server_hits = raw_hits = 0
    for query, server_ids in zip(queries, server_tops, strict=True):
        scores = vectors @ np.asarray(raw.model.embed_query(query), dtype=np.float32)
        kth = np.partition(scores, -TOP_K)[-TOP_K] - _TIE
        server_hits += sum(bool(scores[row[i]] >= kth) for i in server_ids)
        raw_hits += sum(bool(scores[row[i]] >= kth) for i in raw.search(query))
    asked = TOP_K * len(queries)
    return {
        "queries": len(queries),
        "vectors": total,
        "server_recall": server_hits / asked,
        "raw_recall": raw_hits / asked,
    }
