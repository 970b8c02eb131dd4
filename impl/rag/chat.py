"""OpenAI-style chat completions, in the RAG stack's terms: a "model" is a retrieval profile,
the last message is the question, the earlier ones the history it is rewritten against, and
the answer comes from the tenant's documents with its citations. Nothing is stored.

The wire format (ids, chunks, ``[DONE]``) is the web layer's; this module gives the answer's
deltas, then the answer with its token usage.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Literal

from impl.errors import FieldError, InvalidInput, NotFound
from impl.rag.rewriting import QuestionRewriting
from impl.rag.service import RagService
from impl.rag.types import (
    Answer,
    DoneEvent,
    Exchange,
    RetrievalEvent,
    RetrievalOptions,
    TokenEvent,
)

PROFILES: dict[str, RetrievalOptions] = {
    "ragapi": RetrievalOptions(mode="hybrid"),
    "ragapi-dense": RetrievalOptions(mode="dense"),
    "ragapi-lexical": RetrievalOptions(mode="lexical"),
}
PROFILES_CREATED = 1764633600  # 2025-12-02T00:00:00Z, when the profiles were introduced
CHAT_TOP_K = 5  # the passages a question of /api/v1/query gets by default

Role = Literal["system", "developer", "user", "assistant"]


class UnknownModel(NotFound):
    """A model name that is no retrieval profile (OpenAI's model_not_found)."""


@dataclass(frozen=True)
class Message:
    role: Role
    text: str | None  # None: an assistant message without content


@dataclass(frozen=True)
class Usage:
    """Tokens counted with the embedding model's tokenizer. The prompt is every message and
    every retrieved passage; the completion is the answer."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completed:
    """The last event of a completion."""

    answer: Answer
    usage: Usage


ChatEvent = TokenEvent | Completed


def split_messages(messages: Sequence[Message]) -> tuple[str, list[Exchange]]:
    """The question (the last message, the user's) and the history before it: each user
    message with the assistant's reply that follows it. System and developer messages do not
    change a grounded answer and are left out."""
    last = messages[-1]
    if last.role != "user" or not last.text or not last.text.strip():
        raise InvalidInput(
            "The last message must be the user's question, with text.",
            [FieldError(f"body/messages/{len(messages) - 1}", "Must be a user message.")],
        )
    history: list[Exchange] = []
    for message in messages[:-1]:
        if message.role == "user" and message.text:
            history.append(Exchange(message.text, ""))
        elif message.role == "assistant" and history and not history[-1].answer:
            history[-1] = Exchange(history[-1].question, message.text or "")
    return last.text, history


class ChatCompletions:
    def __init__(self, service: RagService, rewriting: QuestionRewriting) -> None:
        self._service = service
        self._rewriting = rewriting

    def stream(
        self, tenant: str, model: str, messages: Sequence[Message]
    ) -> Generator[ChatEvent, None, None]:
        """The answer's deltas, then Completed. Errors of the request (an unknown model, no
        question) come from the first next(), before any event; close() stops the
        generation."""
        retrieval = PROFILES.get(model)
        if retrieval is None:
            raise UnknownModel(f"The model `{model}` does not exist; GET /v1/models lists them.")
        question, history = split_messages(messages)
        standalone = self._rewriting.standalone(question, history)
        count = self._rewriting.count_tokens
        prompt_tokens = sum(count(m.text) for m in messages if m.text)
        events = self._service.stream_answer(
            tenant, standalone, top_k=CHAT_TOP_K, retrieval=retrieval
        )
        with closing(events):
            for event in events:
                if isinstance(event, RetrievalEvent):
                    prompt_tokens += sum(count(hit.chunk.text) for hit in event.hits)
                elif isinstance(event, TokenEvent):
                    yield event
                else:
                    assert isinstance(event, DoneEvent)
                    usage = Usage(prompt_tokens, count(event.answer.answer))
                    yield Completed(event.answer, usage)
