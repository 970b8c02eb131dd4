"""Code written against the generated Python client type-checks against it (mypy, strict, the
project's settings): a client regenerated from a changed spec breaks its users here, before
they run."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

USERS = ["tests/clients/test_python_client.py", "ui/app.py", "ui/api.py"]


def test_the_client_s_users_type_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", *USERS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
