"""The benchmark's text: docstrings of the Python standard library and of the packages installed
in ragapi's environment. Real English prose about code, offline, and fixed by the Python version
and constraints.txt, so two runs on two machines read the same words.

Each source file is one document: its docstrings, blank-line separated. A hash of the file's
name gives every document one role for good, whatever sizes a run asks for: most documents are
seeded into the store, one in ten feeds the queries, one in ten is ingested over HTTP.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import random
import re
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from impl.errors import RagapiError
from impl.rag.chunking import Chunker, ChunkSpan
from impl.rag.embeddings import count_tokens, load_tokenizer
from impl.rag.loaders import ParseLimits, detect_media_type, extract_text
from impl.settings import Settings

# Seeded chunks are shorter than the server's 200-token default so that embedding 100k of them
# costs about half an hour of one core instead of three hours. The store's search cost does
# not depend on the chunk length (every vector has 384 dimensions); what does (the bytes of the
# response, the sentences the extractive answer ranks) is smaller, as docs/benchmarks.md says.
SEED_CHUNK_TOKENS = 48
SEED_OVERLAP_TOKENS = 0

_ROLES = 10  # one role in ten each for queries and for HTTP ingestion, the rest seeded
_QUERY_ROLE, _INGEST_ROLE = 0, 1
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_QUERY_WORDS = range(4, 31)
# Documents ingested over HTTP carry a few to a few dozen 200-token chunks each, as uploads do.
_MIN_INGEST_BYTES = 2_000
MAX_INGEST_BYTES = 40_000
# Generated API clients (kubernetes' repeats the same parameter lines thousands of times) and
# inherited boilerplate would make half the seeded chunks copies, which no real collection
# holds: a document whose chunks are more than this share repeats is left out.
_MAX_REPEATED = 0.3
# A sentence ends at a full stop followed by a capital, so "e.g. foo" does not end one.
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)])\.\s+(?=[A-Z])")


@dataclass(frozen=True)
class SourceDocument:
    name: str  # "stdlib/json/decoder.py", "site-packages/numpy/linalg/_linalg.py"
    docstrings: tuple[str, ...]

    @property
    def content(self) -> bytes:
        return "\n\n".join(self.docstrings).encode()

    @property
    def filename(self) -> str:
        return self.name.replace("/", ".") + ".txt"

    @property
    def role(self) -> int:
        return int(hashlib.sha256(self.name.encode()).hexdigest()[:8], 16) % _ROLES


def _docstrings(path: Path) -> tuple[str, ...]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in older sources
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return ()
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = (ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds))
    return tuple(text for text in found if text and text.strip())


def documents() -> Iterator[SourceDocument]:
    """Every source file with docstrings: the standard library first, then site-packages, each
    in sorted path order."""
    paths = sysconfig.get_paths()
    roots = (("stdlib", Path(paths["stdlib"])), ("site-packages", Path(paths["purelib"])))
    for label, root in roots:
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root)
            if _SKIPPED_DIRS.intersection(relative.parts[:-1]):
                continue
            docstrings = _docstrings(path)
            if docstrings:
                yield SourceDocument(f"{label}/{relative.as_posix()}", docstrings)


def seed_chunker() -> Chunker:
    """The chunker a service with seed.seed_settings() builds."""
    return Chunker(
        count_tokens=functools.partial(count_tokens, load_tokenizer()),
        chunk_tokens=SEED_CHUNK_TOKENS,
        overlap_tokens=SEED_OVERLAP_TOKENS,
    )


@dataclass(frozen=True)
class Plan:
    """What one run needs from the corpus."""

    seed: list[SourceDocument]  # in seeding order
    stage_documents: dict[int, int]  # stage size in chunks -> documents seeded up to it
    chunk_texts: list[str]  # every seeded chunk, as the seeding service's chunker cuts it
    queries: list[str]
    ingest: list[SourceDocument]


class _Splitter:
    """Chunks of a document exactly as the seeding service makes them: detected, extracted and
    split by the same functions."""

    def __init__(self) -> None:
        self._chunker = seed_chunker()
        self._limits = ParseLimits.from_settings(Settings())

    def chunks(self, document: SourceDocument) -> tuple[str, list[ChunkSpan]]:
        content = document.content
        try:
            extracted = extract_text(
                content, detect_media_type(content, document.filename), self._limits
            )
        except RagapiError:
            return "", []
        return extracted.text, self._chunker.split(extracted)

    def cut(self, document: SourceDocument, need: int) -> tuple[SourceDocument, list[str]] | None:
        """The document's beginning that chunks into exactly its first ``need`` chunks."""
        text, spans = self.chunks(document)
        prefix = SourceDocument(document.name, (text[: spans[need - 1].end_char],))
        _, cut_spans = self.chunks(prefix)
        wanted = [span.text for span in spans[:need]]
        if [span.text for span in cut_spans] != wanted:
            return None  # the prefix chunks differently: the caller takes the next document
        return prefix, wanted


def plan(sizes: list[int], query_count: int, ingest_bytes: int) -> Plan:
    """Documents whose chunks add up to exactly each size (the document that ends a stage is
    cut at a chunk boundary), the queries, and documents of ``ingest_bytes`` or more to ingest
    over HTTP."""
    splitter = _Splitter()
    sizes = sorted(sizes)
    seed: list[SourceDocument] = []
    stage_documents: dict[int, int] = {}
    chunk_texts: list[str] = []
    query_lines: list[str] = []
    ingest: list[SourceDocument] = []
    ingested = stage = 0
    seen_contents: set[bytes] = set()
    seen_chunks: set[str] = set()
    for document in documents():
        digest = hashlib.sha256(document.content).digest()
        if digest in seen_contents:
            continue  # a vendored copy: the server would answer "duplicate"
        seen_contents.add(digest)
        role = document.role
        if role == _QUERY_ROLE:
            query_lines.extend(_summary_lines(document))
        elif role == _INGEST_ROLE:
            size = len(document.content)
            if ingested < ingest_bytes and _MIN_INGEST_BYTES <= size <= MAX_INGEST_BYTES:
                ingest.append(document)
                ingested += size
        elif stage < len(sizes):
            texts = [span.text for span in splitter.chunks(document)[1]]
            if len(texts) - len(set(texts) - seen_chunks) > _MAX_REPEATED * len(texts):
                continue  # repeats its own chunks or those seeded before
            need = sizes[stage] - len(chunk_texts)
            if len(texts) > need:
                cut = splitter.cut(document, need)
                if cut is None:
                    continue
                document, texts = cut
            if texts:
                seed.append(document)
                chunk_texts.extend(texts)
                seen_chunks.update(texts)
            if len(chunk_texts) == sizes[stage]:
                stage_documents[sizes[stage]] = len(seed)
                stage += 1
        # Twice the queries asked for leaves a sample, not the first lines read.
        if stage == len(sizes) and ingested >= ingest_bytes and len(query_lines) >= 2 * query_count:
            break
    if stage < len(sizes):
        raise SystemExit(f"the corpus holds fewer than {sizes[stage]} chunks")
    if ingested < ingest_bytes:
        raise SystemExit(f"the corpus holds fewer than {ingest_bytes} bytes to ingest")
    return Plan(seed, stage_documents, chunk_texts, _sample(query_lines, query_count), ingest)


def _summary_lines(document: SourceDocument) -> list[str]:
    """First sentences of the docstrings of a document the store never holds: questions in the
    corpus's own words whose answers are nearby, not verbatim, passages."""
    lines = []
    for docstring in document.docstrings:
        paragraph = " ".join(docstring.split("\n\n", 1)[0].split())
        sentence = _SENTENCE_END.split(paragraph, maxsplit=1)[0]
        if len(sentence.split()) in _QUERY_WORDS:
            lines.append(sentence)
    return lines


def _sample(lines: list[str], count: int) -> list[str]:
    unique = sorted(set(lines))
    random.Random(0).shuffle(unique)
    if len(unique) < count:
        raise SystemExit(f"only {len(unique)} queries found; {count} were asked for")
    return unique[:count]
