"""The model providers' shared chain (fit the hits, fill the prompt, stream the chat model),
and the provider of any OpenAI-compatible chat endpoint."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import SecretStr

from impl.errors import ConfigurationError, UpstreamError
from impl.rag.answers.base import AnswerProvider, AnswerStream
from impl.rag.answers.citations import (
    ANSWER_PROMPT,
    map_citations,
    prompt_inputs,
    renumber,
    settled,
)
from impl.rag.types import SearchHit, TermStatisticsLookup
from impl.settings import Settings


@dataclass(frozen=True)
class AnswerRequest:
    """What the model provider chains take: the question and its hits, best first, never empty."""

    question: str
    hits: list[SearchHit]


def _request_inputs(request: AnswerRequest) -> dict[str, str]:
    return prompt_inputs(request.question, request.hits)


def _failure_reason(exc: Exception) -> str:
    import openai  # loaded already: exc is one of its errors (see openai_answer_provider)

    if isinstance(exc, openai.APITimeoutError):
        return "it did not answer in time"
    if isinstance(exc, openai.APIConnectionError):
        return "it could not be reached"
    if isinstance(exc, openai.APIStatusError):
        return f"it answered HTTP {exc.status_code}"
    return "its response could not be read"


class ChatAnswerProvider(AnswerProvider):
    """A chat model behind the shared prompt and citation mapping: [fit] -> prompt -> model,
    streamed; markers are rewritten as the text arrives, and map_citations has the last word."""

    def __init__(
        self,
        name: str,
        model: Runnable[PromptValue, BaseMessage],
        fit: Runnable[AnswerRequest, AnswerRequest] | None = None,
        upstream_errors: tuple[type[Exception], ...] = (),
    ) -> None:
        self.name = name
        self._fit = fit
        # The model client's errors that mean its endpoint failed (openai's for the openai
        # provider), named by the provider so that this module need not import the client.
        self._upstream_errors = upstream_errors
        # Nothing may follow the model in this chain, not even an output parser: closed early,
        # LangChain's streaming wrapper of a step reads the rest of that step's input before it
        # returns (Runnable._transform_stream_with_config), so a parser after the model would
        # pull the whole answer from the model before close() returned.
        self._chain = RunnableLambda(_request_inputs) | ANSWER_PROMPT | model

    def stream(
        self,
        question: str,
        hits: list[SearchHit],
        statistics: TermStatisticsLookup | None = None,  # the model weighs the words itself
    ) -> AnswerStream:
        request = AnswerRequest(question, hits)
        if self._fit is not None:
            request = self._fit.invoke(request)
        raw = ""
        sent = 0
        try:
            # Runnable.stream is a generator: closing it closes the model's stream in turn.
            chunks = cast("Generator[BaseMessage, None, None]", self._chain.stream(request))
            with closing(chunks):
                for chunk in chunks:
                    raw += chunk.text
                    # Rewritten from the start each time, by the rewrite map_citations uses: an
                    # answer is a few hundred tokens, and one rewrite keeps the two texts equal.
                    text = renumber(settled(raw), len(request.hits)).text.strip()
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
        except self._upstream_errors as exc:
            raise UpstreamError(
                f"the language model endpoint failed: {_failure_reason(exc)}"
            ) from exc
        # What was sent is the start of this text; the rest is what the end of the answer
        # settled, and the [1] attached to an answer that cited nothing.
        text, citations = map_citations(raw, request.question, request.hits)
        if len(text) > sent:
            yield text[sent:]
        return text, citations


def openai_answer_provider(settings: Settings) -> ChatAnswerProvider:
    # Imported here, not with the module: the extractive default never uses openai and
    # langchain_openai, which added 28 MB to a process's memory (measured in a fresh process:
    # the server's imports held 190 MB with them, 162 MB without; docs/benchmarks.md, Memory).
    import openai
    from langchain_openai import ChatOpenAI

    if settings.llm_base_url is None and settings.llm_api_key is None:
        raise ConfigurationError(
            "answer_provider 'openai' needs llm_api_key for the OpenAI API, or llm_base_url "
            "for another OpenAI-compatible endpoint"
        )
    # Always pass a key: left out, the client would read OPENAI_API_KEY from the environment
    # and could send a real OpenAI key to a third-party endpoint. Local servers ignore it.
    api_key = settings.llm_api_key or SecretStr("unused")
    # OpenAI's own API takes max_completion_tokens (reasoning models refuse max_tokens) and
    # refuses both at once; other servers (llama.cpp's Python server, older vLLM and Ollama)
    # know only max_tokens and ignore the other name, so the answer would be unbounded.
    openai_api = settings.llm_base_url is None or urlsplit(settings.llm_base_url).hostname == (
        "api.openai.com"
    )
    model = ChatOpenAI(
        model=settings.llm_model,
        base_url=settings.llm_base_url,
        api_key=api_key,
        timeout=settings.llm_timeout_seconds,
        # One retry absorbs a dropped connection without tripling the wait on a dead endpoint.
        max_retries=1,
        max_completion_tokens=settings.max_answer_tokens if openai_api else None,
        extra_body=None if openai_api else {"max_tokens": settings.max_answer_tokens},
        temperature=0,
    )
    return ChatAnswerProvider("openai", model, upstream_errors=(openai.APIError,))
