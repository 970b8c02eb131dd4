"""How well retrieval finds the passage that answers, and how well answers answer, on a labelled
question set (``ragapi eval``).

A question file holds one JSON object a line (eval/README.md describes the shipped set):
answerable questions name the document that answers them, a ``passage`` marker (a verbatim
piece of the answering passage) and an ``answer`` string (the key term a good answer contains);
unanswerable ones say ``"answerable": false``. A retrieved chunk is relevant to a question iff
it belongs to the named document and contains the marker, both compared with whitespace
collapsed. The judgments are made over every chunk the target holds, so recall and nDCG know
every relevant chunk, not only the retrieved ones.

The measures come from ir-measures (trec_eval underneath); the targets are a RagService
in-process or a ragapi server over HTTP.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, get_args

import ir_measures
from ir_measures import RR, R, Success, nDCG

from impl.errors import InvalidInput, UpstreamError
from impl.rag.service import DEFAULT_RETRIEVAL, RagService
from impl.rag.types import IngestItem, RetrievalMode, RetrievalOptions

MODES: tuple[RetrievalMode, ...] = get_args(RetrievalMode)
MEASURES = {
    "hit@1": Success @ 1,
    "hit@5": Success @ 5,
    "mrr@10": RR @ 10,
    "ndcg@10": nDCG @ 10,
    "recall@10": R @ 10,
}
# Answers are asked as a client asks them: with the API's default number of passages.
ANSWER_TOP_K = 5
_PAGE = 100
_HTTP_TIMEOUT_SECONDS = 300
_INGEST_TIMEOUT_SECONDS = 3600


def normalise(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Question:
    id: str
    kind: str  # identifier | natural | unanswerable: reported separately
    question: str
    answerable: bool
    document: str | None = None  # file name of the answering document
    answer: str | None = None  # the key term a good answer contains
    passage: str | None = None  # a verbatim piece of the answering passage


def load_questions(path: Path) -> list[Question]:
    questions: list[Question] = []
    seen: set[str] = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {number}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(raw, dict) or not isinstance(raw.get("question"), str):
            raise InvalidInput(f"{where}: an object with a 'question' string is expected")
        answerable = raw.get("answerable", True)
        labels = [raw.get(name) for name in ("document", "answer", "passage")]
        if answerable and not all(isinstance(label, str) and label.strip() for label in labels):
            raise InvalidInput(
                f"{where}: an answerable question needs 'document', 'answer' and 'passage'"
            )
        question_id = str(raw.get("id", f"line{number}"))
        if question_id in seen:
            raise InvalidInput(f"{where}: the id {question_id!r} is used twice")
        seen.add(question_id)
        questions.append(
            Question(
                id=question_id,
                kind=str(raw.get("kind", "answerable" if answerable else "unanswerable")),
                question=raw["question"],
                answerable=bool(answerable),
                document=raw.get("document"),
                answer=raw.get("answer"),
                passage=raw.get("passage"),
            )
        )
    if not any(q.answerable for q in questions):
        raise InvalidInput(f"{path.name} holds no answerable question")
    return questions


@dataclass(frozen=True)
class Passage:
    """A chunk as the evaluation sees it: its id, the file name of its document, its text."""

    chunk_id: str
    document: str
    text: str


@dataclass(frozen=True)
class GivenAnswer:
    text: str
    cited_documents: frozenset[str]
    found: bool


class Target(Protocol):
    """What is evaluated: a RagService in-process, or a server over HTTP."""

    def passages(self) -> Iterator[Passage]:
        """Every chunk of every ready document."""
        ...

    def search(self, query: str, retrieval: RetrievalOptions, top_k: int) -> list[Passage]: ...

    def answer(self, question: str) -> GivenAnswer: ...


class ServiceTarget:
    def __init__(self, service: RagService, tenant: str) -> None:
        self._service = service
        self._tenant = tenant
        self._names = {d.id: d.filename or d.title for d in self._documents()}

    def _documents(self) -> Iterator[Any]:
        cursor = None
        while True:
            page = self._service.list_documents(
                self._tenant, limit=_PAGE, cursor=cursor, status="ready"
            )
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def passages(self) -> Iterator[Passage]:
        for document_id, name in self._names.items():
            cursor = None
            while True:
                page = self._service.list_chunks(
                    self._tenant, document_id, limit=_PAGE, cursor=cursor
                )
                for chunk in page.items:
                    yield Passage(chunk.id, name, chunk.text)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor

    def search(self, query: str, retrieval: RetrievalOptions, top_k: int) -> list[Passage]:
        hits = self._service.search(self._tenant, query, top_k=top_k, retrieval=retrieval)
        return [
            Passage(h.chunk.id, self._names.get(h.chunk.document_id, ""), h.chunk.text)
            for h in hits
        ]

    def answer(self, question: str) -> GivenAnswer:
        answer = self._service.answer(self._tenant, question, top_k=ANSWER_TOP_K)
        cited = frozenset(self._names.get(c.document_id, "") for c in answer.citations)
        return GivenAnswer(answer.answer, cited, answer.found)


class HttpTarget:
    """A running ragapi server, through its public API (the key needs the read scope)."""

    def __init__(self, url: str, api_key: str) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise InvalidInput(f"the server URL must be http:// or https://, not {url!r}")
        self._api = url.rstrip("/") + "/api/v1"
        self._api_key = api_key
        self._names = {d["id"]: d["filename"] or d["title"] for d in self._pages("/documents")}

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        # The scheme was checked when the target was made: only http(s) is ever opened.
        request = urllib.request.Request(  # noqa: S310
            self._api + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"X-API-Key": self._api_key, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT_SECONDS) as response:  # noqa: S310
                return json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                detail = json.load(exc).get("detail", "")
            except ValueError:
                detail = ""
            raise UpstreamError(f"the server answered {exc.code} to {path}: {detail}") from exc
        except urllib.error.URLError as exc:
            raise UpstreamError(
                f"the server at {self._api} cannot be reached: {exc.reason}"
            ) from exc

    def _pages(self, path: str, **params: str) -> Iterator[dict[str, Any]]:
        query = {"limit": str(_PAGE), **params}
        while True:
            page = self._call(f"{path}?{urllib.parse.urlencode(query)}")
            yield from page["items"]
            if page["next_cursor"] is None:
                return
            query["cursor"] = page["next_cursor"]

    def passages(self) -> Iterator[Passage]:
        for document_id, name in self._names.items():
            for chunk in self._pages(f"/documents/{document_id}/chunks"):
                yield Passage(chunk["id"], name, chunk["text"])

    def search(self, query: str, retrieval: RetrievalOptions, top_k: int) -> list[Passage]:
        options = {
            "mode": retrieval.mode,
            "weights": {"dense": retrieval.dense_weight, "lexical": retrieval.lexical_weight},
            "rrf_k": retrieval.rrf_k,
            "candidates": retrieval.candidates,
        }
        body = {"query": query, "top_k": top_k, "retrieval": options}
        return [
            Passage(r["chunk_id"], self._names.get(r["document_id"], ""), r["text"])
            for r in self._call("/search", body)["results"]
        ]

    def answer(self, question: str) -> GivenAnswer:
        answer = self._call("/query", {"question": question, "top_k": ANSWER_TOP_K})
        cited = frozenset(self._names.get(c["document_id"], "") for c in answer["citations"])
        return GivenAnswer(answer["answer"], cited, answer["found"])


def ingest_folder(service: RagService, tenant: str, folder: Path) -> None:
    """Ingests every file under ``folder`` and waits for it; any failure is an error, since a
    missing document would count against every question it answers."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise InvalidInput(f"{folder} holds no file")
    for path in files:
        job = service.submit_ingest(tenant, [IngestItem(path.read_bytes(), path.name, None, {})])
        job = service.wait_for_job(tenant, job.id, timeout_s=_INGEST_TIMEOUT_SECONDS)
        if job.status != "succeeded":
            reason = job.error.detail if job.error else f"still {job.status}"
            raise InvalidInput(f"ingesting {path.name} failed: {reason}")


Judgments = dict[str, dict[str, int]]  # question id -> relevant chunk id -> grade
Run = dict[str, dict[str, float]]  # question id -> retrieved chunk id -> score


def judge(questions: Sequence[Question], passages: Sequence[Passage]) -> Judgments:
    """The relevant chunks of each answerable question among every chunk held."""
    by_document: dict[str, list[Passage]] = {}
    for passage in passages:
        by_document.setdefault(passage.document, []).append(passage)
    judgments: Judgments = {}
    for q in questions:
        if q.answerable:
            marker = normalise(q.passage or "")
            judgments[q.id] = {
                p.chunk_id: 1
                for p in by_document.get(q.document or "", [])
                if marker in normalise(p.text)
            }
    return judgments


@dataclass(frozen=True)
class RetrievalScores:
    questions: int
    hit_at_1: float
    hit_at_5: float
    mrr_at_10: float
    ndcg_at_10: float
    recall_at_10: float


def score_run(judgments: Judgments, run: Run) -> RetrievalScores:
    """The measures over every judged question. trec_eval leaves out a question with no
    retrieved or no relevant chunk, which would flatter the figures; a placeholder makes each
    such question count, as zero, whatever the library does with it."""
    qrels = {
        qid: relevant or {"(no chunk holds the passage)": 1} for qid, relevant in judgments.items()
    }
    complete = {qid: run.get(qid) or {"(nothing retrieved)": 0.0} for qid in qrels}
    values = ir_measures.calc_aggregate(list(MEASURES.values()), qrels, complete)
    figures = {name: float(values[measure]) for name, measure in MEASURES.items()}
    return RetrievalScores(
        questions=len(qrels),
        hit_at_1=figures["hit@1"],
        hit_at_5=figures["hit@5"],
        mrr_at_10=figures["mrr@10"],
        ndcg_at_10=figures["ndcg@10"],
        recall_at_10=figures["recall@10"],
    )


def ranked(hits: Sequence[Passage]) -> dict[str, float]:
    """Scores that keep the target's order: trec_eval sorts by score and breaks ties by id, so
    the targets' own scores (equal fused scores happen) could reorder the list."""
    scores: dict[str, float] = {}
    for hit in hits:
        scores.setdefault(hit.chunk_id, float(len(hits) - len(scores)))
    return scores


@dataclass(frozen=True)
class AnswerScores:
    answerable: int
    unanswerable: int
    contains_answer: float  # answerable questions whose answer holds the expected string
    cites_document: float  # answerable questions whose answer cites the expected document
    not_found: float  # unanswerable questions answered "not found"


@dataclass(frozen=True)
class QuestionResult:
    """One question's outcome, for finding what to fix."""

    id: str
    kind: str
    # Per mode, the 1-based rank of the first relevant chunk among the results (None: none).
    first_relevant: dict[str, int | None]
    answer: str
    found: bool
    contains_answer: bool | None  # None for an unanswerable question
    cites_document: bool | None


@dataclass(frozen=True)
class Report:
    top_k: int
    fusion: RetrievalOptions  # the weights, rrf_k and candidates of the hybrid runs
    documents: int
    chunks: int
    retrieval: dict[str, RetrievalScores]
    by_kind: dict[str, dict[str, RetrievalScores]]
    answers: AnswerScores
    questions: list[QuestionResult]
    # Answerable questions whose passage marker no chunk holds: a label to fix.
    unjudged: list[str] = field(default_factory=list)


def evaluate(
    target: Target,
    questions: Sequence[Question],
    modes: Sequence[RetrievalMode],
    top_k: int,
    fusion: RetrievalOptions = DEFAULT_RETRIEVAL,
) -> Report:
    """Every mode's search, then the default answer, for each question. ``fusion`` holds the
    hybrid options (its mode is replaced by each of ``modes``)."""
    passages = list(target.passages())
    judgments = judge(questions, passages)
    answerable = [q for q in questions if q.answerable]
    kinds = sorted({q.kind for q in answerable})
    runs = {
        mode: {
            q.id: ranked(target.search(q.question, replace(fusion, mode=mode), top_k))
            for q in answerable
        }
        for mode in modes
    }
    results = [
        outcome(q, target.answer(q.question), judgments.get(q.id, {}), runs) for q in questions
    ]
    return Report(
        top_k=top_k,
        fusion=fusion,
        documents=len({p.document for p in passages}),
        chunks=len(passages),
        retrieval={mode: score_run(judgments, run) for mode, run in runs.items()},
        by_kind={
            mode: {
                kind: score_run({q.id: judgments[q.id] for q in answerable if q.kind == kind}, run)
                for kind in kinds
            }
            for mode, run in runs.items()
        },
        answers=score_answers(results),
        questions=results,
        unjudged=[qid for qid, relevant in judgments.items() if not relevant],
    )


def outcome(
    q: Question, given: GivenAnswer, relevant: dict[str, int], runs: dict[RetrievalMode, Run]
) -> QuestionResult:
    first_relevant: dict[str, int | None] = {}
    for mode, run in runs.items():
        ranks = [rank for rank, chunk in enumerate(run.get(q.id, {}), 1) if chunk in relevant]
        first_relevant[mode] = ranks[0] if ranks else None
    return QuestionResult(
        id=q.id,
        kind=q.kind,
        first_relevant=first_relevant,
        answer=given.text,
        found=given.found,
        contains_answer=(
            normalise(q.answer or "").lower() in normalise(given.text).lower()
            if q.answerable
            else None
        ),
        cites_document=q.document in given.cited_documents if q.answerable else None,
    )


def score_answers(results: Sequence[QuestionResult]) -> AnswerScores:
    answerable = [r for r in results if r.contains_answer is not None]
    unanswerable = [r for r in results if r.contains_answer is None]
    return AnswerScores(
        answerable=len(answerable),
        unanswerable=len(unanswerable),
        contains_answer=_share(r.contains_answer for r in answerable),
        cites_document=_share(r.cites_document for r in answerable),
        not_found=_share(not r.found for r in unanswerable),
    )


def _share(flags: Iterable[bool | None]) -> float:
    values = list(flags)
    return sum(bool(v) for v in values) / len(values) if values else 0.0


def as_json(report: Report) -> dict[str, Any]:
    return asdict(report)


def as_table(report: Report) -> str:
    header = f"{'mode':<8} {'kind':<12} {'n':>3}  " + "  ".join(f"{m:>9}" for m in MEASURES)
    lines = [
        f"{report.documents} documents, {report.chunks} chunks, top {report.top_k}; hybrid: "
        f"weights {report.fusion.dense_weight:g} dense, {report.fusion.lexical_weight:g} "
        f"lexical, rrf_k {report.fusion.rrf_k}, {report.fusion.candidates} candidates",
        header,
        "-" * len(header),
    ]
    for mode, scores in report.retrieval.items():
        rows = [("all", scores), *report.by_kind[mode].items()]
        for kind, s in rows:
            figures = (s.hit_at_1, s.hit_at_5, s.mrr_at_10, s.ndcg_at_10, s.recall_at_10)
            lines.append(
                f"{mode:<8} {kind:<12} {s.questions:>3}  "
                + "  ".join(f"{value:>9.3f}" for value in figures)
            )
    a = report.answers
    lines += [
        "",
        f"answers (default provider, top {ANSWER_TOP_K}):",
        f"  contain the expected answer   {a.contains_answer:.3f}  of {a.answerable} answerable",
        f"  cite the expected document    {a.cites_document:.3f}  of {a.answerable} answerable",
        f'  say "not found"               {a.not_found:.3f}  of {a.unanswerable} unanswerable',
    ]
    if report.unjudged:
        lines.append(f"no chunk holds the passage of: {', '.join(report.unjudged)}")
    return "\n".join(lines)
