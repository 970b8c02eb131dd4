"""The CLI drives the same services in-process: a folder of every type in, list, search,
query with citations, show and delete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.documents import CORPUS, make_docx, make_html, make_markdown, make_pdf, make_text


def ragapi(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "impl.cli", *args],
        cwd=ROOT,
        env={**os.environ, "RAGAPI_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_cli_end_to_end(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "nested").mkdir(parents=True)
    (folder / "rust.pdf").write_bytes(make_pdf(CORPUS["rust"].paragraphs))
    (folder / "sourdough.docx").write_bytes(make_docx(CORPUS["sourdough"].paragraphs))
    (folder / "nested" / "saturn.html").write_bytes(
        make_html(CORPUS["saturn"].title, CORPUS["saturn"].paragraphs)
    )
    revolution = CORPUS["french_revolution"]
    (folder / "revolution.md").write_bytes(make_markdown(revolution.title, revolution.paragraphs))
    (folder / "photosynthesis.txt").write_bytes(make_text(CORPUS["photosynthesis"].paragraphs))
    data = tmp_path / "data"

    ingested = ragapi(data, "ingest", str(folder), "--metadata", '{"source": "cli"}')
    assert ingested.returncode == 0, ingested.stderr
    assert ingested.stdout.count(": succeeded doc_") == 5

    again = ragapi(data, "ingest", str(folder / "rust.pdf"))
    assert "(duplicate)" in again.stdout

    listed = ragapi(data, "documents", "list")
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert len(rows) == 5 and all(row[1] == "ready" for row in rows)

    answer = ragapi(data, "query", CORPUS["saturn"].question)
    assert answer.returncode == 0, answer.stderr
    first_line, *citations = answer.stdout.splitlines()
    assert "[1]" in first_line
    # Titled by the page's own <title>, not its file name.
    assert citations[0].startswith(f"[1] {CORPUS['saturn'].title}:")

    searched = ragapi(data, "search", CORPUS["rust"].question, "--top-k", "2")
    assert "  rust #" in searched.stdout.splitlines()[0]

    rust_id = next(row[0] for row in rows if row[-1] == "rust")
    shown = json.loads(ragapi(data, "documents", "show", rust_id).stdout)
    assert shown["media_type"] == "application/pdf"
    assert shown["metadata"] == {"source": "cli"}

    assert ragapi(data, "documents", "delete", rust_id).returncode == 0
    gone = ragapi(data, "documents", "show", rust_id)
    assert gone.returncode == 2
    assert f"document {rust_id} not found" in gone.stderr
    after = ragapi(data, "search", CORPUS["rust"].question, "--top-k", "10")
    assert after.stdout and "  rust #" not in after.stdout


def test_unsupported_files_are_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (tmp_path / "fine.txt").write_text("Lighthouses guide ships along dangerous coasts.")
    result = ragapi(
        tmp_path / "data", "ingest", str(tmp_path / "image.png"), str(tmp_path / "fine.txt")
    )
    assert result.returncode == 1
    assert "image.png" in result.stderr
    assert "fine.txt: succeeded" in result.stdout
