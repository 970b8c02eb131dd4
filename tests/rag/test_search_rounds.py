"""A search that finds chunks of documents still being indexed drops them, and searches again
only when that could change its answer: the answer is always the one the second search gives.

The second search is simulated on the whole ranked lists each index would return: it finds the
same lists without the dropped documents, cut at the same depth."""

from __future__ import annotations

import random

import pytest

from impl.rag.lexical import LexicalHit
from impl.rag.service import _another_round_changes_nothing, _fuse
from impl.rag.store import DenseHit
from impl.rag.types import RetrievalMode, RetrievalOptions

DEPTH = 50


def ranked_lists(
    rng: random.Random, documents: int, length: int
) -> tuple[list[DenseHit], list[LexicalHit]]:
    """Each index's whole answer, best first: chunks of ``documents`` documents, the two lists
    sharing some chunks, as dense and BM25 candidates of one question do."""
    chunks = [(f"c{n}", f"d{rng.randrange(documents)}") for n in range(length * 2)]
    dense_order = rng.sample(chunks, length)
    lexical_order = rng.sample(dense_order[: length // 2], length // 4) + rng.sample(chunks, length)
    lexical_unique = list(dict.fromkeys(lexical_order))[:length]
    dense = [DenseHit(c, d, 1, 1.0 - n / 1000) for n, (c, d) in enumerate(dense_order)]
    lexical = [LexicalHit(c, d, 1, 20.0 - n / 10) for n, (c, d) in enumerate(lexical_unique)]
    return dense, lexical


def without(hits: list, dropped: set[str]) -> list:  # type: ignore[type-arg]
    return [hit for hit in hits if hit.document_id not in dropped]


@pytest.mark.parametrize("mode", ["hybrid", "dense", "lexical"])
def test_dropping_hits_answers_as_the_second_search_would(mode: RetrievalMode) -> None:
    rng = random.Random(20261203)
    shortcuts = 0
    trials = 3000
    for _ in range(trials):
        top_k = rng.choice([1, 5, 10, 20])
        depth = DEPTH if mode == "hybrid" else top_k
        options = RetrievalOptions(
            mode=mode,
            dense_weight=rng.choice([1.0, 2.0]),
            lexical_weight=1.0,
            rrf_k=rng.choice([20, 60]),
            candidates=depth,
        )
        dense_all, lexical_all = ranked_lists(rng, documents=40, length=depth + 30)
        first_dense = [] if mode == "lexical" else dense_all[:depth]
        first_lexical = [] if mode == "dense" else lexical_all[:depth]
        found = sorted({hit.document_id for hit in [*first_dense, *first_lexical]})
        not_ready = set(rng.sample(found, min(len(found), rng.choice([1, 1, 2, 3]))))
        kept_dense = without(first_dense, not_ready)
        kept_lexical = without(first_lexical, not_ready)
        if not _another_round_changes_nothing(
            options,
            kept_dense,
            kept_lexical,
            more_dense=len(first_dense) == depth,
            more_lexical=len(first_lexical) == depth,
            top_k=top_k,
        ):
            continue
        shortcuts += 1
        second_dense = [] if mode == "lexical" else without(dense_all, not_ready)[:depth]
        second_lexical = [] if mode == "dense" else without(lexical_all, not_ready)[:depth]
        assert (
            _fuse(options, kept_dense, kept_lexical)[:top_k]
            == _fuse(options, second_dense, second_lexical)[:top_k]
        )
    if mode == "hybrid":
        # Most searches that find a document being indexed are spared their second round.
        assert shortcuts > trials / 2
    else:
        # A list cut at top_k that loses a hit needs the second search to fill it.
        assert shortcuts == 0
