"""The labelled set in eval/ and the measures of `ragapi eval`: every label points at text its
document really holds, the measures give the hand-computed figures, and on the shipped set the
retrieval modes are measured as CI gates them."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from impl.rag.embeddings import EmbeddingModel
from impl.rag.evaluation import (
    MODES,
    Passage,
    Report,
    ServiceTarget,
    evaluate,
    ingest_folder,
    judge,
    load_questions,
    normalise,
    ranked,
    score_run,
)
from impl.rag.loaders import ParseLimits, detect_media_type, extract_text
from impl.rag.service import RagService
from tests.conftest import ROOT
from tests.rag.conftest import make_settings

EVAL = ROOT / "eval"
QUESTIONS = load_questions(EVAL / "questions.jsonl")


def test_the_set_has_the_questions_the_issue_asks_for() -> None:
    kinds = Counter(q.kind for q in QUESTIONS)
    assert kinds["identifier"] >= 20
    assert kinds["identifier"] + kinds["natural"] >= 60
    assert kinds["unanswerable"] >= 10
    assert all(q.answerable == (q.kind != "unanswerable") for q in QUESTIONS)
    assert len({normalise(q.question).lower() for q in QUESTIONS}) == len(QUESTIONS)


def test_every_label_occurs_in_its_documents_extracted_text() -> None:
    """Markers are matched with whitespace collapsed, as `ragapi eval` matches them; a loader
    change that breaks a label shows here, naming it."""
    limits = ParseLimits.from_settings(make_settings(Path("unused")))
    texts = {}
    for path in (EVAL / "sqlite-doc").iterdir():
        content = path.read_bytes()
        texts[path.name] = normalise(
            extract_text(content, detect_media_type(content, path.name), limits).text
        )
    broken = []
    for q in QUESTIONS:
        if not q.answerable:
            continue
        text = texts[q.document or ""]
        if text.count(normalise(q.passage or "")) != 1:
            broken.append(f"{q.id}: passage occurs {text.count(normalise(q.passage or ''))}x")
        if normalise(q.answer or "").lower() not in text.lower():
            broken.append(f"{q.id}: answer missing")
    assert broken == []


def test_the_measures_on_a_hand_checked_case(tmp_path: Path) -> None:
    """q1: its only relevant chunk first. q2: one of its two relevant chunks third. q3: nothing
    relevant retrieved. Relevance comes from the passage marker, not from the document alone."""
    raw = [
        {"id": "q1", "question": "?", "document": "a.html", "answer": "x", "passage": "alpha beta"},
        {"id": "q2", "question": "?", "document": "b.html", "answer": "x", "passage": "gamma"},
        {"id": "q3", "question": "?", "document": "c.html", "answer": "x", "passage": "delta"},
        {"id": "u1", "question": "?", "answerable": False},
    ]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in raw))
    held = [
        Passage("a1", "a.html", "alpha\n  beta is here"),  # matched across the line break
        Passage("a2", "a.html", "alpha only"),
        Passage("b1", "b.html", "gamma one"),
        Passage("b2", "b.html", "and gamma two"),
        Passage("x1", "x.html", "gamma, but in another document"),
        Passage("c1", "c.html", "delta"),
    ]
    questions = load_questions(path)
    judgments = judge(questions, held)
    assert judgments == {"q1": {"a1": 1}, "q2": {"b1": 1, "b2": 1}, "q3": {"c1": 1}}
    by_id = {p.chunk_id: p for p in held}
    run = {
        "q1": ranked([by_id["a1"], by_id["a2"], by_id["x1"]]),
        "q2": ranked([by_id["a1"], by_id["x1"], by_id["b2"]]),
        "q3": ranked([by_id["a2"]]),
    }
    scores = score_run(judgments, run)
    assert scores.questions == 3
    assert scores.hit_at_1 == pytest.approx(1 / 3)
    assert scores.hit_at_5 == pytest.approx(2 / 3)
    assert scores.mrr_at_10 == pytest.approx((1 + 1 / 3 + 0) / 3)
    # q2: DCG 1/log2(4) against the ideal 1 + 1/log2(3).
    assert scores.ndcg_at_10 == pytest.approx((1 + 0.5 / (1 + 1 / math.log2(3)) + 0) / 3)
    assert scores.recall_at_10 == pytest.approx((1 + 0.5 + 0) / 3)


def test_a_question_nothing_was_retrieved_for_counts_zero() -> None:
    judgments = {"q1": {"a1": 1}, "q2": {"b1": 1}}
    scores = score_run(judgments, {"q1": {"a1": 1.0}})
    assert scores.questions == 2
    assert scores.mrr_at_10 == pytest.approx(0.5)


@pytest.fixture(scope="module")
def shipped(
    tmp_path_factory: pytest.TempPathFactory, embeddings: EmbeddingModel
) -> Iterator[Report]:
    data_dir = tmp_path_factory.mktemp("eval") / "data"
    service = RagService(make_settings(data_dir), embeddings)
    try:
        service.start()
        ingest_folder(service, "default", EVAL / "sqlite-doc")
        yield evaluate(ServiceTarget(service, "default"), QUESTIONS, MODES, top_k=10)
    finally:
        service.close()


def test_the_shipped_set_is_measured_whole(shipped: Report) -> None:
    answerable = sum(q.answerable for q in QUESTIONS)
    assert shipped.unjudged == []
    assert shipped.documents == len(list((EVAL / "sqlite-doc").iterdir()))
    assert shipped.chunks < 1000  # keeps this test's ingestion within a minute or so
    for mode in MODES:
        scores = shipped.retrieval[mode]
        assert scores.questions == answerable
        assert sum(s.questions for s in shipped.by_kind[mode].values()) == answerable
    assert shipped.answers.answerable == answerable
    assert shipped.answers.unanswerable == len(QUESTIONS) - answerable
    assert [r.id for r in shipped.questions] == [q.id for q in QUESTIONS]


def test_the_library_and_the_per_question_ranks_agree(shipped: Report) -> None:
    """hit@1 and MRR@10 recomputed from each question's first relevant rank."""
    for mode in MODES:
        firsts = [r.first_relevant[mode] for r in shipped.questions if r.kind != "unanswerable"]
        scores = shipped.retrieval[mode]
        assert scores.hit_at_1 == pytest.approx(sum(f == 1 for f in firsts) / len(firsts))
        reciprocal = [1 / f if f is not None and f <= 10 else 0.0 for f in firsts]
        assert scores.mrr_at_10 == pytest.approx(sum(reciprocal) / len(firsts))


def test_hybrid_ranks_at_least_as_well_as_each_single_mode(shipped: Report) -> None:
    """The issue's gate on regressions: fusion must not lose to either of its inputs."""
    hybrid = shipped.retrieval["hybrid"]
    for single in ("dense", "lexical"):
        assert hybrid.ndcg_at_10 >= shipped.retrieval[single].ndcg_at_10, single
        assert hybrid.mrr_at_10 >= shipped.retrieval[single].mrr_at_10, single


def test_the_default_answers_hold_the_answer_and_admit_what_the_documents_lack(
    shipped: Report,
) -> None:
    """The extractive answerer on hybrid hits, as `ragapi eval` reports it, gated at the
    issue's targets: the expected answer in at least 70% of the answerable questions (it
    reaches 0.741, three questions above), and "not found" for at least 90% of the
    unanswerable ones (it reaches 1.000)."""
    assert shipped.answers.contains_answer >= 0.70
    assert shipped.answers.not_found >= 0.90
