"""Handlers of the conversations tag."""

from __future__ import annotations

from collections.abc import Generator
from typing import Annotated

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from generated import models
from impl.api.deps import ConversationStore, CurrentPrincipal
from impl.api.handlers import convert
from impl.api.handlers.documents import given
from impl.api.handlers.streaming import encode, event_stream, problem_event, sse
from impl.api.inputs import BODY, PARAMS
from impl.api.problems import request_id
from impl.api.responses import reply
from impl.api.security import Principal
from impl.rag.conversations import (
    Conversation,
    ConversationDetail,
    Owner,
    Turn,
    TurnEvent,
    TurnStored,
)


def owner(principal: Principal) -> Owner:
    return Owner(principal.tenant, principal.key_id)


def conversation(value: Conversation) -> models.Conversation:
    return models.Conversation.model_validate(value, from_attributes=True)


def turn(value: Turn) -> models.ConversationTurn:
    return models.ConversationTurn.model_validate(value, from_attributes=True)


def detail(value: ConversationDetail) -> models.ConversationDetail:
    return models.ConversationDetail.model_validate(value, from_attributes=True)


async def create_conversation(
    body: Annotated[models.ConversationCreate, BODY],
    conversations: ConversationStore,
    principal: CurrentPrincipal,
) -> Response:
    made = await run_in_threadpool(conversations.create, owner(principal), given(body.title))
    return reply(conversation(made), 201, headers={"Location": f"/api/v1/conversations/{made.id}"})


async def list_conversations(
    params: Annotated[models.ListConversationsParams, PARAMS],
    conversations: ConversationStore,
    principal: CurrentPrincipal,
) -> Response:
    page = await run_in_threadpool(
        lambda: conversations.list_page(
            owner(principal), limit=params.limit, cursor=given(params.cursor)
        )
    )
    items = [conversation(item) for item in page.items]
    return reply(models.ConversationPage(items=items, next_cursor=page.next_cursor))


async def get_conversation(
    params: Annotated[models.GetConversationParams, PARAMS],
    conversations: ConversationStore,
    principal: CurrentPrincipal,
) -> Response:
    found = await run_in_threadpool(
        conversations.get, owner(principal), params.conversation_id.root
    )
    return reply(detail(found))


async def delete_conversation(
    params: Annotated[models.DeleteConversationParams, PARAMS],
    conversations: ConversationStore,
    principal: CurrentPrincipal,
) -> Response:
    await run_in_threadpool(conversations.delete, owner(principal), params.conversation_id.root)
    return Response(status_code=204)


def encode_turn_event(event: TurnEvent) -> bytes:
    if isinstance(event, TurnStored):
        return sse("done", turn(event.turn))
    return encode(event)


def stored_turn(events: Generator[TurnEvent, None, None]) -> Turn:
    *_, last = events
    assert isinstance(last, TurnStored)  # Conversations.ask always ends with one
    return last.turn


async def post_conversation_message(
    params: Annotated[models.PostConversationMessageParams, PARAMS],
    body: Annotated[models.ConversationMessage, BODY],
    conversations: ConversationStore,
    principal: CurrentPrincipal,
    request: Request,
) -> Response:
    events = conversations.ask(
        owner(principal),
        params.conversation_id.root,
        body.question,
        top_k=body.top_k,
        filters=convert.filters(body.filters),
        min_score=given(body.min_score),
        retrieval=convert.retrieval(body.retrieval),
    )
    if body.stream:
        rid = request_id(request)
        return await event_stream(events, encode_turn_event, lambda exc: problem_event(exc, rid))
    return reply(turn(await run_in_threadpool(stored_turn, events)))
