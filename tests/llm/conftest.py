"""Tests that need real language models: llama-cpp-python (the `llamacpp` extra, which compiles
llama.cpp from source) serves SmolLM2-135M as an OpenAI-compatible server and runs it
in-process. The README's test command leaves this folder out (`norecursedirs` in
pyproject.toml), so setting up for it stays quick; `.ci/run` installs the extra and runs it:
`python3 scripts/dev.py test-llm`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.llm.server import start_llm_server, stop
from tests.rag.conftest import embeddings

__all__ = ["embeddings"]  # the RAG tests' session fixture, for the corpus these tests reuse


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (http://127.0.0.1:PORT/v1) of a llama.cpp server running SmolLM2-135M."""
    process, base_url = start_llm_server(tmp_path_factory.mktemp("llm") / "llama-server.log")
    try:
        yield base_url
    finally:
        stop(process)
