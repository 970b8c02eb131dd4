"""The CLI drives the same services in-process: a folder of every type in, list, search,
query with citations, show and delete; what it tells about an ingest (a line per file, a
summary, failures named with their reasons and the exit status) and about an empty data
directory."""

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
    assert ingested.stdout.splitlines()[-1] == "5 ingested, 0 duplicates (already held), 0 failed"
    assert ingested.stderr.count(f"ragapi: data directory {data}") == 1

    again = ragapi(data, "ingest", str(folder / "rust.pdf"))
    assert "(duplicate)" in again.stdout
    assert again.stdout.splitlines()[-1] == "0 ingested, 1 duplicate (already held), 0 failed"

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


def test_failed_files_are_summed_up_with_their_reasons_and_the_exit_status(
    tmp_path: Path,
) -> None:
    image, fine = tmp_path / "image.png", tmp_path / "fine.txt"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    fine.write_text("Lighthouses guide ships along dangerous coasts.")
    result = ragapi(tmp_path / "data", "ingest", str(image), str(fine), str(tmp_path / "gone.md"))
    assert result.returncode == 1
    assert f"{fine}: succeeded doc_" in result.stdout
    assert result.stdout.splitlines()[-1] == "1 ingested, 0 duplicates (already held), 2 failed"
    summary = result.stderr[result.stderr.index("ragapi: 2 of them failed:") :].splitlines()
    assert summary[1].startswith(f"  {image}: the file looks like a PNG image; ragapi reads ")
    assert summary[2] == f"  {tmp_path / 'gone.md'}: No such file or directory"


def test_reading_an_empty_data_directory_says_so_and_creates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for command, said in (
        (["documents", "list"], "no documents"),
        (["keys", "list"], "no keys"),
        (["search", "anything"], "no documents"),
    ):
        result = ragapi(data, *command)
        assert (result.returncode, result.stdout) == (0, f"{said}\n"), result.stderr
        assert result.stderr == f"ragapi: data directory {data}\n"
    shown = ragapi(data, "documents", "show", "doc_123")
    assert (shown.returncode, shown.stderr.splitlines()[-1]) == (
        2,
        "ragapi: document doc_123 not found",
    )
    assert not data.exists()


def test_documents_replace_and_patch_and_jobs_list_and_cancel(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = tmp_path / "ferry.txt"
    first.write_text("The ferry to the island leaves at nine every morning.")
    assert ragapi(data, "ingest", str(first)).returncode == 0
    [row] = [line.split() for line in ragapi(data, "documents", "list").stdout.splitlines()]
    doc_id = row[0]

    second = tmp_path / "ferry-winter.txt"
    second.write_text("In winter the ferry to the island leaves at ten, weather permitting.")
    replaced = ragapi(data, "documents", "replace", doc_id, str(second))
    assert replaced.returncode == 0, replaced.stderr
    assert replaced.stdout.strip() == f"{doc_id}: version 2, 1 chunks"
    unchanged = ragapi(data, "documents", "replace", doc_id, str(second))
    assert unchanged.stdout.strip() == f"{doc_id}: unchanged (the same content)"
    found = ragapi(data, "search", "when does the ferry leave")
    assert "leaves at ten" in found.stdout and "at nine" not in found.stdout

    patched = ragapi(
        data, "documents", "patch", doc_id, "--title", "Ferry", "--metadata", '{"season": "winter"}'
    )
    assert patched.returncode == 0, patched.stderr
    shown = json.loads(ragapi(data, "documents", "show", doc_id).stdout)
    assert (shown["title"], shown["metadata"], shown["version"]) == (
        "Ferry",
        {"season": "winter"},
        2,
    )
    cleared = ragapi(data, "documents", "patch", doc_id, "--metadata", "null")
    assert json.loads(cleared.stdout)["metadata"] == {}

    reindexed = ragapi(data, "documents", "reindex", doc_id)
    assert reindexed.stdout.strip() == f"{doc_id}: version 3, 1 chunks", reindexed.stderr

    jobs = [line.split() for line in ragapi(data, "jobs", "list").stdout.splitlines()]
    # Newest first: the re-index, the unchanged replacement, the replacement, the ingest.
    assert len(jobs) == 4 and all(job[1] == "succeeded" for job in jobs)
    assert all(job[-1] == doc_id for job in jobs)
    assert ragapi(data, "jobs", "list", "--status", "failed").stdout.strip() == "no jobs"
    refused = ragapi(data, "jobs", "cancel", jobs[0][0])
    assert refused.returncode == 2 and "has already succeeded" in refused.stderr

    # Every document of the tenant re-indexed from its stored original, as one job.
    ready = len(ragapi(data, "documents", "list").stdout.splitlines())
    tenant = ragapi(data, "reindex", "--all-tenants")
    assert tenant.returncode == 0, tenant.stderr
    summary = tenant.stdout.strip()
    assert summary.startswith(f"default: {ready} documents re-indexed ("), summary
    assert json.loads(ragapi(data, "documents", "show", doc_id).stdout)["version"] == 4
    found = ragapi(data, "search", "when does the ferry leave")
    assert "leaves at ten" in found.stdout
