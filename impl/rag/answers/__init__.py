"""Answer generation: a question and its ranked search hits in, answer text with citations out.

Every provider streams: ``stream(question, hits, statistics)`` is an ``AnswerStream``, a
generator that yields the answer text in deltas and returns ``(text, citations)``, where
``text`` is the deltas concatenated. Closing it stops the generation. ``generate`` is the same
stream, drained. ``statistics`` (optional) looks up the collection's document frequencies.

- ``extractive`` (default): quotes the retrieved sentences that best answer the question. No
  model runs: sentences are scored lexically (BM25 over the question's stemmed terms, its
  identifiers such as ``sqlite3_open()``, ``--flag`` or ``E1234`` weighing double, the heading
  above a sentence counting for the sentences right under it) together with their chunk's rank
  in the search, so an answer costs about a millisecond. Embedding every sentence instead would
  cost more than the search itself. A heading is quoted only with the text under it, a lead-in
  ending in ":" with the line it introduces, each quoted passage with the sentence after it in
  its paragraph. When no quoted passage holds the question's key terms (weighted by rarity in
  the whole collection, from the lexical index's document frequencies, or among the hits when
  the caller gives none) and none comes from a chunk at least ``answer_min_score`` similar to
  the question or from a chunk that both signals of a hybrid search rank at the top and that
  holds the names the question asks about (or states the name or number a question naming
  none asks for), or when a name the question asks about is in no retrieved chunk (a
  wildcard family, ``sqlite3_bind_*``, names its members), the answer is NO_ANSWER, citing
  nothing. A setting's value that is a common word ("synchronous=OFF") counts
  as a term, and the parts of a hyphenated word ("write-ahead") weigh as one term. A question
  that asks "how often" prefers sentences that state a number, one that asks "how do I" those
  that name a function, command or setting it does not name itself. It
  streams one quote at a time.
- ``openai``: any OpenAI-compatible chat endpoint through ``ChatOpenAI``.
- ``llamacpp``: a local GGUF model through llama-cpp-python (the optional ``llamacpp`` extra).

The two model providers are LangChain chains of one shape (fit the hits, fill the prompt, stream
the chat model) and share the prompt and the citation mapping (``map_citations``): the model is
asked to cite its sources as ``[n]``; every marker is checked against the retrieved hits, markers
that point at nothing retrieved are dropped, the rest are renumbered in order of first use, and
each citation quotes the exact passage of its chunk that best supports the sentence citing it.
Markers are rewritten while the answer streams (a ``[`` is held back until it is known to be a

Modules: ``base`` (the interface), ``extractive``, ``chat`` (the shared chain and the
``openai`` provider), ``llamacpp``, ``citations`` (the prompt and the citation mapping) and
``text`` (the sentence analysis the extractive provider and the citation mapping share).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from impl.rag.answers.base import AnswerProvider, AnswerStream
from impl.rag.answers.chat import AnswerRequest, ChatAnswerProvider, openai_answer_provider
from impl.rag.answers.citations import (
    ANSWER_PROMPT,
    DONT_KNOW,
    map_citations,
    prompt_inputs,
    says_it_does_not_know,
)
from impl.rag.answers.extractive import (
    MAX_EXTRACTIVE_SENTENCES,
    NO_ANSWER,
    ExtractiveAnswerProvider,
    dense_score,
)
from impl.rag.answers.llamacpp import (
    LLAMACPP_CONTEXT_TOKENS,
    default_llamacpp_model_path,
    llamacpp_answer_provider,
)
from impl.rag.answers.text import MAX_QUOTE_CHARS
from impl.settings import Settings

if TYPE_CHECKING:
    from impl.rag.embeddings import EmbeddingModel

__all__ = [
    "ANSWER_PROMPT",
    "DONT_KNOW",
    "LLAMACPP_CONTEXT_TOKENS",
    "MAX_EXTRACTIVE_SENTENCES",
    "MAX_QUOTE_CHARS",
    "NO_ANSWER",
    "AnswerProvider",
    "AnswerRequest",
    "AnswerStream",
    "ChatAnswerProvider",
    "ExtractiveAnswerProvider",
    "build_answer_provider",
    "default_llamacpp_model_path",
    "dense_score",
    "llamacpp_answer_provider",
    "map_citations",
    "openai_answer_provider",
    "prompt_inputs",
    "says_it_does_not_know",
]


def build_answer_provider(settings: Settings, embeddings: EmbeddingModel) -> AnswerProvider:
    """The provider that settings.answer_provider names.

    ``embeddings`` is part of the interface for providers that rank semantically; the ones
    here rank lexically, because embedding every sentence would cost more than the search."""
    if settings.answer_provider == "openai":
        return openai_answer_provider(settings)
    if settings.answer_provider == "llamacpp":
        return llamacpp_answer_provider(settings)
    return ExtractiveAnswerProvider(settings.answer_min_score)
