"""One entry point that sets itself up: needs only Python 3.11+ and pip.

    python3 scripts/dev.py serve [ragapi serve flags]   start the server (embedded default)
    python3 scripts/dev.py test [pytest args]           run the test suite
    python3 scripts/dev.py test-llm [pytest args]       the tests with real language models
    python3 scripts/dev.py lint                         ruff, mypy and the import contracts
    python3 scripts/dev.py ui [streamlit run flags]     the Streamlit UI on http://localhost:8501
    python3 scripts/dev.py setup                        only create or update .venv

The virtualenv is .venv in the repository; it is (re)installed from constraints.txt whenever
pyproject.toml or constraints.txt changed since the last install.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".ragapi-installed"
# The ui extra is in the test set-up for the UI's tests. The llamacpp extra compiles llama.cpp
# from source (minutes on a quiet machine, far longer on a loaded one), so only test-llm installs
# it: the tests under tests/llm run the OpenAI-compatible provider against a real llama.cpp server
# and the llamacpp provider in-process; `.ci/run` runs them after the suite.
EXTRAS = {
    "serve": "",
    "test": "[dev,ui]",
    "test-llm": "[dev,llamacpp,ui]",
    "lint": "[dev,ui]",
    "setup": "[dev,ui]",
    "ui": "[ui]",
}
LLM_TESTS = "tests/llm"
# ragapi uses llama.cpp for text only: leaving out its multimodal library (mtmd) shortens the
# build. A CMAKE_ARGS of the user's own replaces this.
LLAMACPP_CMAKE_ARGS = "-DLLAVA_BUILD=OFF"


def fingerprint(extras: str) -> str:
    digest = hashlib.sha256(extras.encode())
    for name in ("pyproject.toml", "constraints.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def installed_fingerprints() -> set[str]:
    return set(STAMP.read_text().split()) if STAMP.exists() else set()


def setup(extras: str) -> None:
    wanted = fingerprint(extras)
    if wanted in installed_fingerprints():
        return
    if not (BIN / "python").exists():
        print("creating .venv", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print(f"installing ragapi{extras} into .venv (first time takes a few minutes)", file=sys.stderr)
    env = {"CMAKE_ARGS": LLAMACPP_CMAKE_ARGS, **os.environ}
    subprocess.run(
        [*pip, "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}{extras}"], check=True, env=env
    )
    STAMP.write_text("\n".join(sorted(installed_fingerprints() | {wanted})))


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    setup(EXTRAS[command])
    os.chdir(ROOT)
    if command == "serve":
        return subprocess.call([str(BIN / "ragapi"), "serve", *rest])
    if command == "test":
        return subprocess.call([str(BIN / "python"), "-m", "pytest", *rest])
    if command == "test-llm":
        return subprocess.call([str(BIN / "python"), "-m", "pytest", LLM_TESTS, *rest])
    if command == "ui":
        # The UI is a client of the HTTP API: start the server too (`dev.py serve`), or set
        # RAGAPI_UI_API_URL to another one.
        return subprocess.call([str(BIN / "streamlit"), "run", "ui/app.py", *rest])
    if command == "lint":
        checks = [
            [str(BIN / "ruff"), "check", "."],
            [str(BIN / "ruff"), "format", "--check", "."],
            [str(BIN / "mypy")],
            # The layer rules of ARCHITECTURE.md ([tool.importlinter] in pyproject.toml).
            [str(BIN / "lint-imports")],
        ]
        # lint-imports finds the packages on sys.path: this checkout's, whichever checkout
        # .venv was installed from.
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return max(subprocess.call(check, env=env) for check in checks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
