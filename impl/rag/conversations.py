"""Conversations: questions asked one after another, each rewritten to stand alone from the
history (rewriting.py), answered with citations by the RAG service, and stored with them.

A conversation belongs to one tenant, and with ``conversations_per_key`` to the key that made
it; anyone else's id is not found, as for documents. Rows live in the registry's database (the
process's one engine for its URL).
"""

from __future__ import annotations

import uuid
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
    delete,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from impl.db import Base, decode_time_cursor, encode_time_cursor, open_database, utcnow
from impl.errors import InvalidInput, NotFound
from impl.rag.types import (
    Citation,
    DoneEvent,
    Exchange,
    Page,
    RetrievalEvent,
    RetrievalOptions,
    SearchFilters,
    TokenEvent,
)
from impl.settings import Settings

if TYPE_CHECKING:
    # Only for annotations: the migrations import this module for its tables, and must not
    # load the RAG stack.
    from impl.rag.rewriting import QuestionRewriting
    from impl.rag.service import RagService

MAX_PAGE_SIZE = 100
DEFAULT_RETRIEVAL = RetrievalOptions()
_INSERT_ATTEMPTS = 3  # two turns posted at once to one conversation take the same index


class ConversationRow(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(256))
    key_id: Mapped[str | None] = mapped_column(String(64))  # None: made with auth off
    title: Mapped[str | None] = mapped_column(Text)
    turn_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (Index("ix_conversations_tenant_created", "tenant", "created_at", "id"),)


class TurnRow(Base):
    __tablename__ = "conversation_turns"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    question: Mapped[str] = mapped_column(Text)
    standalone_question: Mapped[str] = mapped_column(Text)
    answer: Mapped[str] = mapped_column(Text)
    found: Mapped[bool] = mapped_column(Boolean)
    citations: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    provider: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("conversation_id", "position"),)


@dataclass(frozen=True)
class Owner:
    """Who asks: the tenant, and the key (None with auth off)."""

    tenant: str
    key_id: str | None


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str | None
    turn_count: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Turn:
    id: str
    index: int
    question: str
    standalone_question: str
    answer: str
    found: bool
    citations: list[Citation]
    provider: str
    created_at: datetime


@dataclass(frozen=True)
class ConversationDetail(Conversation):
    turns: list[Turn]


@dataclass(frozen=True)
class TurnStored:
    """The last event of a turn: the turn as stored."""

    turn: Turn


TurnEvent = RetrievalEvent | TokenEvent | TurnStored


def _conversation(row: ConversationRow) -> Conversation:
    return Conversation(row.id, row.title, row.turn_count, row.created_at, row.updated_at)


def _turn(row: TurnRow) -> Turn:
    return Turn(
        id=row.id,
        index=row.position,
        question=row.question,
        standalone_question=row.standalone_question,
        answer=row.answer,
        found=row.found,
        citations=[Citation(**c) for c in row.citations],
        provider=row.provider,
        created_at=row.created_at,
    )


class Conversations:
    """The conversations of every tenant; safe to share between threads (each method is one
    unit of work in its own session)."""

    def __init__(
        self, settings: Settings, service: RagService, rewriting: QuestionRewriting
    ) -> None:
        self._db = open_database(settings.resolved_registry_url)
        self._service = service
        self._rewriting = rewriting
        self._per_key = settings.conversations_per_key

    def close(self) -> None:
        self._db.close()

    def _visible(self, owner: Owner) -> ColumnElement[bool]:
        mine = ConversationRow.tenant == owner.tenant
        return and_(mine, ConversationRow.key_id == owner.key_id) if self._per_key else mine

    def create(self, owner: Owner, title: str | None) -> Conversation:
        now = utcnow()
        row = ConversationRow(
            id=f"conv_{uuid.uuid4().hex}",
            tenant=owner.tenant,
            key_id=owner.key_id,
            title=title,
            turn_count=0,
            created_at=now,
            updated_at=now,
        )
        with self._db.write() as session:
            session.add(row)
        return _conversation(row)

    def list_page(self, owner: Owner, *, limit: int, cursor: str | None) -> Page[Conversation]:
        """Newest first by (created_at, id); the cursor names the last item of a page."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE_SIZE}")
        query = select(ConversationRow).where(self._visible(owner))
        if cursor is not None:
            last_created, last_id = decode_time_cursor(cursor)
            query = query.where(
                or_(
                    ConversationRow.created_at < last_created,
                    and_(ConversationRow.created_at == last_created, ConversationRow.id < last_id),
                )
            )
        query = query.order_by(ConversationRow.created_at.desc(), ConversationRow.id.desc())
        with self._db.read() as session:
            rows = list(session.scalars(query.limit(limit + 1)))
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_cursor = encode_time_cursor(last.created_at, last.id)
        return Page([_conversation(row) for row in rows], next_cursor)

    def get(self, owner: Owner, conversation_id: str) -> ConversationDetail:
        with self._db.read() as session:
            row = self._owned(session, owner, conversation_id)
            turns = session.scalars(
                select(TurnRow)
                .where(TurnRow.conversation_id == conversation_id)
                .order_by(TurnRow.position)
            )
            return ConversationDetail(
                **vars(_conversation(row)), turns=[_turn(turn) for turn in turns]
            )

    def delete(self, owner: Owner, conversation_id: str) -> None:
        with self._db.write() as session:
            self._owned(session, owner, conversation_id)
            # Its turns go with it, by the foreign key's ON DELETE CASCADE.
            session.execute(delete(ConversationRow).where(ConversationRow.id == conversation_id))

    def _owned(self, session: Session, owner: Owner, conversation_id: str) -> ConversationRow:
        row = session.scalars(
            select(ConversationRow).where(
                ConversationRow.id == conversation_id, self._visible(owner)
            )
        ).first()
        if row is None:
            raise NotFound(f"conversation {conversation_id} not found")
        return row

    def _history(self, owner: Owner, conversation_id: str) -> list[Exchange]:
        """The conversation's latest turns, as many as the history bound may keep."""
        with self._db.read() as session:
            self._owned(session, owner, conversation_id)
            rows = session.scalars(
                select(TurnRow)
                .where(TurnRow.conversation_id == conversation_id)
                .order_by(TurnRow.position.desc())
                .limit(self._rewriting.max_turns)
            ).all()
        return [Exchange(row.question, row.answer) for row in reversed(rows)]

    def ask(
        self,
        owner: Owner,
        conversation_id: str,
        question: str,
        *,
        top_k: int,
        filters: SearchFilters | None = None,
        min_score: float | None = None,
        retrieval: RetrievalOptions = DEFAULT_RETRIEVAL,
    ) -> Generator[TurnEvent, None, None]:
        """The turn as it is made: the service's RetrievalEvent and TokenEvents for the question
        rewritten to stand alone, then TurnStored once the answer is stored. As with
        RagService.stream_answer, errors of the request come from the first next(); close()
        stops the generation and stores nothing."""
        standalone = self._rewriting.standalone(question, self._history(owner, conversation_id))
        events = self._service.stream_answer(
            owner.tenant,
            standalone,
            top_k=top_k,
            filters=filters,
            min_score=min_score,
            retrieval=retrieval,
        )
        with closing(events):
            for event in events:
                if isinstance(event, DoneEvent):
                    answer = event.answer
                    yield TurnStored(
                        self._store_turn(
                            owner,
                            conversation_id,
                            question=question,
                            standalone=standalone,
                            answer=answer.answer,
                            found=answer.found,
                            citations=answer.citations,
                            provider=answer.provider,
                        )
                    )
                else:
                    yield event

    def _store_turn(
        self,
        owner: Owner,
        conversation_id: str,
        *,
        question: str,
        standalone: str,
        answer: str,
        found: bool,
        citations: list[Citation],
        provider: str,
    ) -> Turn:
        attempts = 0
        while True:
            attempts += 1
            try:
                with self._db.write() as session:
                    conversation = self._owned(session, owner, conversation_id)
                    now = utcnow()
                    row = TurnRow(
                        id=f"turn_{uuid.uuid4().hex}",
                        conversation_id=conversation_id,
                        position=conversation.turn_count,
                        question=question,
                        standalone_question=standalone,
                        answer=answer,
                        found=found,
                        citations=[vars(c) for c in citations],
                        provider=provider,
                        created_at=now,
                    )
                    session.add(row)
                    session.flush()
                    session.execute(
                        update(ConversationRow)
                        .where(ConversationRow.id == conversation_id)
                        .values(turn_count=conversation.turn_count + 1, updated_at=now)
                    )
                    return _turn(row)
            except IntegrityError:
                if attempts == _INSERT_ATTEMPTS:
                    raise
