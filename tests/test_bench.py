"""The benchmark's --quick mode, run as CI runs it: it must finish and write every figure.

Only that the benchmark works is asserted here. Its targets are figures of a quiet machine and
a 100k-chunk store (docs/benchmarks.md); on a CI runner they would only measure the runner.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK_CHUNKS = 250  # not the quick profile's 300: --sizes replaces it
PERCENTILES = ("p50_ms", "p95_ms", "p99_ms", "cpu_ms")
FIGURES = {
    "ingestion": ("http_chunks_per_s", "http_mb_per_s", "raw_chunks_per_s", "chunks_per_s_ratio"),
    "health": ("full_rps", "bare_rps", "full_p95_ms", "bare_p95_ms", "rps_ratio"),
    "interference": ("idle_p95_ms", "during_p95_ms", "ingest_chunks_per_s", "p95_ratio"),
    "footprint": ("rss_idle_mb", "rss_loaded_mb", "peak_rss_mb", "ready_seconds"),
    "recall": ("server_recall", "raw_recall"),
    "corpus": ("cache_check_min_cosine", "distinct_chunk_share", "seed_chunk_chars_mean"),
    "embedding": (
        "cpu_ms_per_chunk",
        "gflops_per_cpu_s",
        "gemm_gflops_1core",
        "peak_gflops_1core",
        "peak_fraction",
    ),
}
CONCURRENCY = ("http_rps", "http_p95_ms", "raw_rps", "raw_p95_ms", "rps_ratio")
SCALING_COUNTS = ["1", "2"]  # given, not the machine's cores: the same block on every runner
TARGETS = 14


def figure(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_quick_benchmark_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.bench",
            "--quick",
            "--sizes",
            str(QUICK_CHUNKS),
            "--scaling-counts",
            ",".join(SCALING_COUNTS),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())

    stage = results["stages"][str(QUICK_CHUNKS)]
    # Seeding is correct, not fast: exactly the planned chunks, every vector from the cache.
    assert stage["chunks"] == QUICK_CHUNKS
    assert stage["cache_misses"] == 0
    # POST /search in every retrieval mode (hybrid is "search"), each with its own figures.
    for name in ("raw_search", "search", "search_dense", "search_lexical", "query"):
        for key in PERCENTILES:
            assert figure(stage["latency"][name][key]), (name, key)
    for key in (
        "search_p95_ratio",
        "query_p95_ratio",
        "hybrid_dense_p50_ratio",
        "hybrid_dense_p95_ratio",
        "hybrid_dense_cpu_ratio",
    ):
        assert figure(stage["latency"][key]), key
    for key in ("ready_seconds", "rss_ready_mb", "first_search_ms", "seed_seconds"):
        assert figure(stage[key]), key
    assert stage["latency"]["errors"] == 0  # one client, one request at a time: none may fail

    for section, keys in FIGURES.items():
        for key in keys:
            assert figure(results[section][key]), (section, key)
    for clients in ("1", "8", "32"):
        level = results["concurrency"][clients]
        for key in (*CONCURRENCY, "http_errors", "raw_errors"):
            assert figure(level[key]), (clients, key)
    assert results["ingestion"]["chunks"] == results["ingestion"]["raw_chunks"] > 0

    scaling = results["scaling"]
    assert list(scaling["counts"]) == SCALING_COUNTS
    for count in SCALING_COUNTS:
        figures = scaling["counts"][count]
        # The workers embedded exactly the chunks the raw processes embedded.
        assert figures["workers"]["chunks"] == figures["raw"]["chunks"] > 0, count
        for side in ("workers", "raw"):
            assert figure(figures[side]["chunks_per_s"]), (count, side)
        assert figure(figures["ratio"]), count
    for key in ("lowest_ratio", "workers_2_over_1", "raw_2_over_1"):
        assert figure(scaling[key]), key
    interference = scaling["interference"]
    assert interference["workers"] == 2 and interference["during_searches"] > 0
    assert interference["raw_during_searches"] > 0 and interference["errors"] == 0
    for key in ("idle_p95_ms", "during_p95_ms", "p95_ratio", "raw_during_p95_ms", "raw_p95_ratio"):
        assert figure(interference[key]), key

    targets = results["targets"]
    assert len(targets) == TARGETS
    for target in targets:
        assert figure(target["value"]) and isinstance(target["met"], bool), target
    assert "target" in done.stdout  # the table was printed
    assert f"hybrid p50, p95, CPU ms @{QUICK_CHUNKS} (dense)" in done.stdout
    assert "2 worker(s) chunks/s" in done.stdout
