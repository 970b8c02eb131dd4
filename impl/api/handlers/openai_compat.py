"""Handlers of the openai tag: OpenAI's wire format around impl.rag.chat."""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from typing import Annotated

from pydantic import MISSING, BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from generated import models
from impl.api.deps import Chat, Tenant
from impl.api.handlers.streaming import event_stream
from impl.api.inputs import BODY
from impl.api.problems import classify, openai_error_response
from impl.api.responses import reply
from impl.errors import RagapiError
from impl.rag.chat import PROFILES, PROFILES_CREATED, ChatEvent, Completed, Message, Usage
from impl.rag.types import Citation

DONE = b"data: [DONE]\n\n"


async def list_models() -> Response:
    return reply(
        models.OpenAIModelList(
            object="list",
            data=[
                models.OpenAIModel(
                    id=name,
                    object="model",
                    created=PROFILES_CREATED,
                    owned_by="ragapi",
                )
                for name in PROFILES
            ],
        )
    )


def message(value: models.ChatMessage) -> Message:
    content = value.content
    if isinstance(content, models.Content1):
        text: str | None = "".join(part.text for part in content.root)
    else:
        text = None if content is None else content.root
    return Message(value.role, text)


def citations(values: list[Citation]) -> list[models.Citation]:
    return [models.Citation.model_validate(c, from_attributes=True) for c in values]


def usage(value: Usage) -> models.ChatUsage:
    return models.ChatUsage(
        prompt_tokens=value.prompt_tokens,
        completion_tokens=value.completion_tokens,
        total_tokens=value.total_tokens,
    )


def completed(events: Generator[ChatEvent, None, None]) -> Completed:
    *_, last = events
    assert isinstance(last, Completed)  # ChatCompletions.stream always ends with one
    return last


class ChunkWriter:
    """One streamed completion's `data:` lines, in OpenAI's order: a chunk with the role, one
    per delta, one with finish_reason (and the citations), with include_usage one with no
    choices and the usage, then [DONE]."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{os.urandom(12).hex()}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.started = False

    def chunk(
        self, delta: models.ChatDelta | None, finish: bool = False, end: Usage | None = None
    ) -> bytes:
        choices = []
        if delta is not None:
            choices = [
                models.ChatChunkChoice(
                    index=0, delta=delta, finish_reason="stop" if finish else None, logprobs=None
                )
            ]
        chunk = models.ChatCompletionChunk(
            id=self.id,
            object="chat.completion.chunk",
            created=self.created,
            model=self.model,
            choices=choices,
            # With include_usage every chunk has "usage", null but in the last (as OpenAI's).
            usage=(usage(end) if end else None) if self.include_usage else MISSING,
        )
        return data(chunk)

    def encode(self, event: ChatEvent) -> bytes:
        frames = b""
        if not self.started:
            self.started = True
            frames += self.chunk(models.ChatDelta(role="assistant", content=""))
        if isinstance(event, Completed):
            final = models.ChatDelta(citations=citations(event.answer.citations))
            frames += self.chunk(final, finish=True)
            if self.include_usage:
                frames += self.chunk(None, end=event.usage)
            return frames + DONE
        return frames + self.chunk(models.ChatDelta(content=event.text))


def data(model: BaseModel) -> bytes:
    return f"data: {model.model_dump_json(by_alias=True)}\n\n".encode()


def error_data(exc: RagapiError) -> bytes:
    """A failure midway, as OpenAI streams one (its SDKs raise on an `error` object)."""
    status, slug = classify(exc)
    body = openai_error_response(status, slug, exc.detail, exc, {}).body
    return b"data: " + bytes(body) + b"\n\n"


async def create_chat_completion(
    body: Annotated[models.ChatCompletionRequest, BODY], chat: Chat, tenant: Tenant
) -> Response:
    events = chat.stream(tenant, body.model, [message(m) for m in body.messages])
    if body.stream:
        options = body.stream_options
        include_usage = isinstance(options, models.ChatStreamOptions) and (
            options.include_usage is True
        )
        writer = ChunkWriter(body.model, include_usage)
        return await event_stream(events, writer.encode, error_data)
    done = await run_in_threadpool(completed, events)
    answer = done.answer
    return reply(
        models.ChatCompletion(
            id=f"chatcmpl-{os.urandom(12).hex()}",
            object="chat.completion",
            created=int(time.time()),
            model=body.model,
            choices=[
                models.ChatChoice(
                    index=0,
                    message=models.ChatAnswerMessage(
                        role="assistant",
                        content=answer.answer,
                        refusal=None,
                        citations=citations(answer.citations),
                    ),
                    finish_reason="stop",
                    logprobs=None,
                )
            ],
            usage=usage(done.usage),
        )
    )
