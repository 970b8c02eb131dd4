"""`ragapi eval` as a user runs it: on a folder in-process and against a running server, with the
table on stdout and the figures in a JSON file; both ways measure the same."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, UNLIMITED, start_server

SHIPPED = ROOT / "eval"
# Three of the shipped pages, and the questions about them: a few dozen chunks.
PAGES = ("rescode.html", "c3ref_exec.html", "lang_vacuum.html")


def ragapi_eval(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "impl.cli", "eval", *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAGAPI_")},
        capture_output=True,
        text=True,
        timeout=600,
    )


def small_set(folder: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    docs = folder / "docs"
    docs.mkdir()
    for page in PAGES:
        shutil.copy(SHIPPED / "sqlite-doc" / page, docs / page)
    lines = [json.loads(line) for line in (SHIPPED / "questions.jsonl").read_text().splitlines()]
    chosen = [q for q in lines if q.get("document") in PAGES] + [
        q for q in lines if not q["answerable"]
    ][:2]
    questions = folder / "questions.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in chosen))
    return docs, questions, chosen


def test_eval_in_process_and_over_http_measure_the_same(tmp_path: Path) -> None:
    docs, questions, chosen = small_set(tmp_path)
    answerable = sum(q["answerable"] for q in chosen)

    fusion = ("--weights", "2,1", "--rrf-k", "20")
    local = ragapi_eval(
        str(questions), "--docs", str(docs), *fusion, "--json", str(tmp_path / "local.json")
    )
    assert local.returncode == 0, local.stderr
    table = local.stdout.splitlines()
    assert table[0].startswith(f"{len(PAGES)} documents, ")
    assert table[0].endswith("hybrid: weights 2 dense, 1 lexical, rrf_k 20, 50 candidates")
    assert table[1].split() == [
        "mode", "kind", "n", "hit@1", "hit@5", "mrr@10", "ndcg@10", "recall@10"
    ]  # fmt: skip
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in table[3:] if line.strip()}
    for mode in ("dense", "lexical", "hybrid"):
        assert rows[(mode, "all")][0] == str(answerable)
    assert f"of {answerable} answerable" in local.stdout
    assert "of 2 unanswerable" in local.stdout

    figures = json.loads((tmp_path / "local.json").read_text())
    assert figures["documents"] == len(PAGES) and figures["unjudged"] == []
    assert figures["fusion"]["dense_weight"] == 2 and figures["fusion"]["rrf_k"] == 20
    assert set(figures["retrieval"]) == {"dense", "lexical", "hybrid"}
    dense = figures["retrieval"]["dense"]
    assert dense["questions"] == answerable
    assert f"{dense['ndcg_at_10']:.3f}" == rows[("dense", "all")][4]
    assert figures["answers"]["answerable"] == answerable
    assert [q["id"] for q in figures["questions"]] == [q["id"] for q in chosen]

    server = start_server(tmp_path / "data", **UNLIMITED)
    try:
        with server.client() as http:
            # One file a request, as the in-process ingestion sends them: a chunk embedded in a
            # run with other documents' chunks (padded to another length) can come out a few
            # units in the seventh digit apart, enough to swap two passages that tie.
            for path in sorted(docs.iterdir()):
                files = [("files", (path.name, path.read_bytes(), "text/html"))]
                assert http.post("/api/v1/ingest?wait=true", files=files).status_code == 200
        remote = ragapi_eval(
            str(questions),
            "--url",
            server.url,
            "--api-key",
            server.api_key,
            *fusion,
            "--json",
            str(tmp_path / "remote.json"),
        )
    finally:
        server.stop()
    assert remote.returncode == 0, remote.stderr
    over_http = json.loads((tmp_path / "remote.json").read_text())
    assert over_http["retrieval"] == figures["retrieval"]
    assert over_http["answers"] == figures["answers"]
    assert over_http["questions"] == figures["questions"]
    assert over_http["chunks"] == figures["chunks"]


def test_eval_names_the_bad_line_of_a_question_file(tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "What is WAL?", "document": "wal.html"}\n')
    result = ragapi_eval(str(questions), "--docs", str(SHIPPED / "sqlite-doc"))
    assert result.returncode == 2
    assert "questions.jsonl line 1: an answerable question needs" in result.stderr


def test_eval_refuses_an_unknown_mode(tmp_path: Path) -> None:
    result = ragapi_eval(str(SHIPPED / "questions.jsonl"), "--modes", "dense,sparse")
    assert result.returncode == 2
    assert "modes are a comma-separated list of dense, lexical, hybrid" in result.stderr
