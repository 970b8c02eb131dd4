"""Schemathesis against a real uvicorn server: every check, positive and negative data, and
the stateful workflows the spec's links describe.

RAGAPI_FUZZ_EXAMPLES raises the examples per operation (default 30) for a deeper run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Server


def test_schemathesis_finds_no_failure(server: Server, tmp_path: Path) -> None:
    examples = os.environ.get("RAGAPI_FUZZ_EXAMPLES", "30")
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        # The repository's config, though the run's working folder is a temporary one.
        "--config-file",
        str(ROOT / "schemathesis.toml"),
        "run",
        str(ROOT / "openapi" / "v1.yaml"),
        "--url",
        server.url,
        "--header",
        f"X-API-Key: {server.api_key}",
        "--checks",
        "all",
        "--mode",
        "all",
        "--seed",
        "20261126",
        "--max-examples",
        examples,
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--workers",
        "1",
        "--no-color",
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
