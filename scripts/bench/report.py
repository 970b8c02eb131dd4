"""The targets of issue 5, checked against one run's figures, and the table printed for it."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    op: str
    limit: float

    @property
    def met(self) -> bool:
        return math.isfinite(self.value) and bool(_OPS[self.op](self.value, self.limit))

    def as_json(self) -> dict[str, Any]:
        return {**vars(self), "met": self.met}


def targets(results: dict[str, Any]) -> list[Target]:
    """Each target of the sections the run measured."""
    found = _store_targets(results) if results["stages"] else []
    return found + _scaling_targets(results["scaling"]) if "scaling" in results else found


def _scaling_targets(scaling: dict[str, Any]) -> list[Target]:
    found = [
        Target(
            "worker / raw embedding chunks/s, lowest of the counts",
            scaling["lowest_ratio"],
            ">=",
            0.8,
        )
    ]
    if "workers_2_over_1" in scaling:
        found.append(
            Target("worker chunks/s, 2 processes / 1", scaling["workers_2_over_1"], ">=", 1.6)
        )
    found.append(
        Target(
            f"search p95 while {scaling['interference']['workers']} worker(s) ingest / idle",
            scaling["interference"]["p95_ratio"],
            "<=",
            1.5,
        )
    )
    return found


def _store_targets(results: dict[str, Any]) -> list[Target]:
    """Each target on the figures of the largest stage (100k chunks in a full run)."""
    largest = results["stages"][str(max(results["sizes"]))]
    at = f"at {largest['chunks']} chunks"
    level = results["concurrency"][str(max(results["concurrency_levels"]))]
    return [
        Target(
            f"dense search p95 / raw p95 {at}", largest["latency"]["search_p95_ratio"], "<=", 1.5
        ),
        Target(
            f"query p95 / raw search p95 {at}", largest["latency"]["query_p95_ratio"], "<=", 2.5
        ),
        Target(
            f"hybrid search p95 / dense search p95 {at}",
            largest["latency"]["hybrid_dense_p95_ratio"],
            "<=",
            1.3,
        ),
        Target(
            "ingest chunks/s / raw embedding chunks/s",
            results["ingestion"]["chunks_per_s_ratio"],
            ">=",
            0.85,
        ),
        Target("32 clients dense search req/s / raw req/s", level["rps_ratio"], ">=", 0.7),
        Target("32 clients search errors", level["http_errors"], "<=", 0),
        Target("health req/s full stack / bare", results["health"]["rps_ratio"], ">=", 0.6),
        Target(
            "search p95 during ingestion / idle", results["interference"]["p95_ratio"], "<=", 3.0
        ),
        Target(f"server RSS {at} (MB)", results["footprint"]["rss_loaded_mb"], "<=", 1200.0),
        Target(
            "embedding FLOP/s per CPU-s / FP32 GEMM peak of a core",
            results["embedding"]["peak_fraction"],
            ">=",
            0.7,
        ),
        Target(f"top-5 recall {at}", results["recall"]["server_recall"], ">=", 0.95),
    ] + (
        [Target("ingestion CPU per document / LangChain peer's", peer["cpu_ratio"], "<=", 0.6)]
        if (peer := results.get("peer"))
        else []
    )


# The latency block's rows, JSON name to label; the ratio column of each is its p95 over the
# raw search's.
_LATENCY_ROWS = {
    "search": "search hybrid",
    "search_dense": "search dense",
    "search_lexical": "search lexical",
    "query": "query",
}


def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def table(results: dict[str, Any], checked: list[Target]) -> str:
    rows = [("figure", "ragapi", "baseline", "ratio")]
    if results["stages"]:
        rows += _store_rows(results)
    if "scaling" in results:
        rows += _scaling_rows(results["scaling"])
    lines = _columns(rows)
    lines.append("")
    lines += _columns(
        [("target", "measured", "limit", "")]
        + [
            (t.name, _f(t.value, 3), f"{t.op} {t.limit:g}", "met" if t.met else "MISSED")
            for t in checked
        ]
    )
    return "\n".join(lines)


def _scaling_rows(scaling: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for count, figures in scaling["counts"].items():
        workers, raw = figures["workers"], figures["raw"]
        rows.append(
            (
                f"{count} worker(s) chunks/s, chunks (raw embedding processes)",
                f"{_f(workers['chunks_per_s'])}, {workers['chunks']}",
                f"{_f(raw['chunks_per_s'])}, {raw['chunks']}",
                _f(figures["ratio"], 2),
            )
        )
        cpu = workers["cpu_seconds"]
        per_chunk = {role: 1000 * seconds / workers["chunks"] for role, seconds in cpu.items()}
        rows.append(
            (
                f"{count} worker(s) CPU ms per chunk: "
                + ", ".join(f"{role} {_f(ms)}" for role, ms in per_chunk.items()),
                _f(sum(per_chunk.values())),
                _f(1000 * raw["cpu_seconds"] / raw["chunks"]),
                _f(1000 * raw["cpu_seconds"] / raw["chunks"] / sum(per_chunk.values()), 2),
            )
        )
    if "workers_2_over_1" in scaling:
        rows.append(
            (
                "chunks/s 2 processes / 1 (raw)",
                _f(scaling["workers_2_over_1"], 2),
                _f(scaling["raw_2_over_1"], 2),
                "",
            )
        )
    it = scaling["interference"]
    rows.append(
        (
            f"search p95 ms while {it['workers']} worker(s) ingest (idle)",
            _f(it["during_p95_ms"]),
            _f(it["idle_p95_ms"]),
            _f(it["p95_ratio"], 2),
        )
    )
    rows.append(
        (
            f"search p95 ms while {it['workers']} raw embedding process(es) run (idle)",
            _f(it["raw_during_p95_ms"]),
            _f(it["idle_p95_ms"]),
            _f(it["raw_p95_ratio"], 2),
        )
    )
    return rows


def _store_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    for size, stage in results["stages"].items():
        lat = stage["latency"]
        raw = lat["raw_search"]
        for name, label in _LATENCY_ROWS.items():
            fig = lat[name]
            rows.append(
                (
                    f"{label} p50/p95/p99 ms @{size} (raw search)",
                    "/".join(_f(fig[p]) for p in ("p50_ms", "p95_ms", "p99_ms")),
                    "/".join(_f(raw[p]) for p in ("p50_ms", "p95_ms", "p99_ms")),
                    _f(fig["p95_ms"] / raw["p95_ms"], 2),
                )
            )
        rows.append(
            (
                f"CPU ms per hybrid/dense/lexical search/query @{size} (raw search)",
                "/".join(_f(lat[name]["cpu_ms"]) for name in _LATENCY_ROWS),
                _f(raw["cpu_ms"]),
                _f(lat["search"]["cpu_ms"] / raw["cpu_ms"], 2),
            )
        )
        hybrid, dense = lat["search"], lat["search_dense"]
        rows.append(
            (
                f"hybrid p50, p95, CPU ms @{size} (dense)",
                ", ".join(_f(hybrid[f]) for f in ("p50_ms", "p95_ms", "cpu_ms")),
                ", ".join(_f(dense[f]) for f in ("p50_ms", "p95_ms", "cpu_ms")),
                ", ".join(_f(lat[f"hybrid_dense_{f}_ratio"], 2) for f in ("p50", "p95", "cpu")),
            )
        )
    emb = results["embedding"]
    rows.append(
        (
            "embedding CPU ms per chunk, GFLOP/s per CPU-s (GEMM)",
            f"{_f(emb['cpu_ms_per_chunk'])}, {_f(emb['gflops_per_cpu_s'])}",
            _f(emb["peak_gflops_1core"]),
            _f(emb["peak_fraction"], 2),
        )
    )
    if peer := results.get("peer"):
        rows.append(
            (
                f"ingestion CPU-s per document, {peer['documents']} pages (LangChain peer)",
                _f(peer["cpu_s_per_document"]["ragapi"], 2),
                _f(peer["cpu_s_per_document"]["peer"], 2),
                _f(peer["cpu_ratio"], 2),
            )
        )
    ing = results["ingestion"]
    rows.append(
        (
            "ingest chunks/s (raw embedding)",
            f"{_f(ing['http_chunks_per_s'])} ({_f(ing['http_mb_per_s'], 3)} MB/s)",
            _f(ing["raw_chunks_per_s"]),
            _f(ing["chunks_per_s_ratio"], 2),
        )
    )
    for clients, level in results["concurrency"].items():
        rows.append(
            (
                f"{clients} clients search req/s, p95 ms, errors (raw)",
                f"{_f(level['http_rps'])}, {_f(level['http_p95_ms'])}, {level['http_errors']}",
                f"{_f(level['raw_rps'])}, {_f(level['raw_p95_ms'])}, {level['raw_errors']}",
                _f(level["rps_ratio"], 2),
            )
        )
    hp = results["health"]
    rows.append(
        (
            "health req/s (bare app)",
            _f(hp["full_rps"], 0),
            _f(hp["bare_rps"], 0),
            _f(hp["rps_ratio"], 2),
        )
    )
    it = results["interference"]
    rows.append(
        (
            "search p95 ms during ingestion (idle)",
            _f(it["during_p95_ms"]),
            _f(it["idle_p95_ms"]),
            _f(it["p95_ratio"], 2),
        )
    )
    fp = results["footprint"]
    rows.append(
        (
            "server RSS MB: loaded (idle, empty)",
            _f(fp["rss_loaded_mb"], 0),
            _f(fp["rss_idle_mb"], 0),
            "",
        )
    )
    rows.append(
        (
            "start to ready s (empty data dir)",
            _f(fp["ready_seconds"], 2),
            _f(fp["ready_empty_seconds"], 2),
            "",
        )
    )
    rc = results["recall"]
    rows.append(
        ("top-5 recall (raw Chroma query)", _f(rc["server_recall"], 3), _f(rc["raw_recall"], 3), "")
    )
    return rows


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines
