"""The layer rules of ARCHITECTURE.md hold ([tool.importlinter] in pyproject.toml, run by
`scripts/dev.py lint`), and a handler that imports chromadb breaks them: checked on a copy of
the tree with such a handler added, so the real tree is never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_of_tree(folder: Path) -> Path:
    tree = folder / "tree"
    tree.mkdir()
    shutil.copy(ROOT / "pyproject.toml", tree)
    ignore = shutil.ignore_patterns("__pycache__")
    for package in ("impl", "generated"):
        shutil.copytree(ROOT / package, tree / package, ignore=ignore)
    return tree


def test_the_tree_keeps_every_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_handler_that_imports_chromadb_breaks_the_contract(tmp_path: Path) -> None:
    tree = copy_of_tree(tmp_path)
    assert lint_imports(tree).returncode == 0  # the copy alone keeps them
    (tree / "impl" / "api" / "handlers" / "shortcut.py").write_text(
        '"""A handler that talks to Chroma itself."""\n\nimport chromadb  # noqa: F401\n'
    )
    result = lint_imports(tree)
    assert result.returncode != 0
    report = " ".join(result.stdout.split())  # rich wraps long contract names
    assert "Handlers are thin" in report and "BROKEN" in report
    assert "impl.api.handlers.shortcut -> chromadb" in report


def test_the_rag_stack_importing_the_web_layer_breaks_the_contract(tmp_path: Path) -> None:
    tree = copy_of_tree(tmp_path)
    (tree / "impl" / "rag" / "web.py").write_text(
        '"""A service that reaches into the web layer."""\n\n'
        "from starlette.requests import Request  # noqa: F401\n\n"
        "from impl.api import deps  # noqa: F401\n"
    )
    result = lint_imports(tree)
    assert result.returncode != 0
    report = " ".join(result.stdout.split())
    assert "impl.rag never imports fastapi or starlette BROKEN" in report
    assert "Layers: the CLI and the web layer on the services" in report
    assert report.count("BROKEN") == 2, report
