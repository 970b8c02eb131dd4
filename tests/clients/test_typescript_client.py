"""The TypeScript client, generated from the spec on each run (clients/ts: openapi-typescript
types, openapi-fetch calls), type-checks and drives a live server through the whole flow."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from tests.conftest import ROOT, Server

PROJECT = ROOT / "clients" / "ts"


def test_the_typescript_client_drives_the_whole_flow(server: Server) -> None:
    npm = shutil.which("npm")
    assert npm, "npm is missing: .ci/run installs Node.js"
    assert (PROJECT / "node_modules").is_dir(), "run `npm ci` in clients/ts first (.ci/run does)"
    env = {
        **os.environ,
        "RAGAPI_E2E_URL": server.url,
        "RAGAPI_E2E_API_KEY": server.api_key,
    }
    # `npm run e2e` regenerates src/schema.d.ts, runs tsc --noEmit, then e2e.ts.
    result = subprocess.run(
        [npm, "run", "e2e"], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "not ok" not in output
    summary = re.search(r"^(\d+) passed, 0 failed$", result.stdout, re.MULTILINE)
    assert summary and int(summary.group(1)) >= 8, output
