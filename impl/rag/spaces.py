"""Vector spaces: which embedding model (and so which Chroma collection) holds each tenant's
vectors, as the registry records it, and the move of a tenant to another model.

Vectors of two models never share a collection, and a search never compares a question embedded
by one model with vectors of another. A tenant's *current* space answers its searches: its
collection, and questions embedded by its model. Writers embed with the model the settings
name; when that is not the tenant's current model, they write into that model's collection
(the tenant's *next* space), which a move fills with the rest and then makes current.

The registry is the source of truth for every process (API processes, ``ragapi worker``s, the
CLI): a tenant's current space is one row, and the move's switch is one write of it. Tenants
without a row are in the *default* space: the model the registry recorded first, in the
collection named for the tenant alone (as every collection was named before spaces existed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from impl.db import Database
from impl.rag.tables import ChunkRow, DocumentRow, MetaRow, chunk_from_row
from impl.rag.types import Chunk, Job, Metadata

_DEFAULT_MODEL_KEY = "embedding_model"
# Meta rows by tenant: a hash, as the key column is short and a tenant id may be long.
_SPACE_PREFIX = "space:"
_MOVE_PREFIX = "move:"


@dataclass(frozen=True)
class Space:
    """An embedding model's vectors of one tenant. ``default``: the collection is named for the
    tenant alone (the default model's, from before spaces existed)."""

    model_id: str
    dimension: int
    default: bool = False

    def same_model(self, other: Space) -> bool:
        return (self.model_id, self.dimension) == (other.model_id, other.dimension)

    def describe(self) -> str:
        return f"{self.model_id} ({self.dimension} dimensions)"


@dataclass(frozen=True)
class Move:
    """A tenant's move to another model, under way: how many of its chunks the new collection
    holds of how many (as last counted)."""

    tenant: str
    target: Space
    chunks_done: int
    chunks_total: int


@dataclass(frozen=True)
class TenantIndex:
    """A tenant's index as a re-index reports it: the space answering its searches, the move
    under way, and the documents' re-index job a request started."""

    current: Space
    move: Move | None
    job: Job | None


@dataclass(frozen=True)
class DocumentChunks:
    """The current version of a ready document: what a move embeds again."""

    document_id: str
    version: int
    metadata: Metadata
    chunks: list[Chunk]


def _tenant_key(prefix: str, tenant: str) -> str:
    return prefix + hashlib.sha256(tenant.encode()).hexdigest()[:40]


def _space_facts(space: Space) -> dict[str, str | int | bool]:
    return {"model_id": space.model_id, "dimension": space.dimension, "default": space.default}


def _space_from(facts: dict[str, Any]) -> Space:
    return Space(
        model_id=str(facts["model_id"]),
        dimension=int(facts["dimension"]),
        default=bool(facts.get("default", False)),
    )


class VectorSpaces:
    """The registry's record of the spaces (a part of ``Registry``)."""

    _db: Database

    def record_default_model(self, model_id: str, dimension: int) -> None:
        """The model of the default space: recorded on first use, never changed after."""
        try:
            with self._db.write() as session:
                if session.get(MetaRow, _DEFAULT_MODEL_KEY) is None:
                    session.add(MetaRow(key=_DEFAULT_MODEL_KEY, value=f"{model_id}|{dimension}"))
        except IntegrityError:
            pass  # another process recorded it first: that one stands

    def current_space(self, tenant: str) -> Space:
        """The space that answers the tenant's searches."""
        with self._db.read() as session:
            row = session.get(MetaRow, _tenant_key(_SPACE_PREFIX, tenant))
            if row is not None:
                return _space_from(json.loads(row.value))
            default = session.get(MetaRow, _DEFAULT_MODEL_KEY)
        if default is None:
            raise RuntimeError("the registry has no default embedding model recorded")
        model_id, _, dimension = default.value.rpartition("|")
        return Space(model_id=model_id, dimension=int(dimension), default=True)

    def switch_space(self, tenant: str, space: Space) -> None:
        """Make ``space`` the tenant's current one: every search that reads the registry after
        the commit uses the new space, none before. A move stays recorded until
        ``finish_move``, after its last step."""
        with self._db.write() as session:
            key = _tenant_key(_SPACE_PREFIX, tenant)
            row = session.get(MetaRow, key)
            value = json.dumps(_space_facts(space))
            if row is None:
                session.add(MetaRow(key=key, value=value))
            else:
                row.value = value

    def finish_move(self, tenant: str) -> None:
        """Forget the tenant's move: done, or abandoned for another model."""
        with self._db.write() as session:
            session.execute(delete(MetaRow).where(MetaRow.key == _tenant_key(_MOVE_PREFIX, tenant)))

    def begin_move(self, tenant: str, target: Space) -> Move:
        """Record the tenant's move to ``target`` (kept across restarts until it completes);
        a move already recorded to the same target is returned as it stands."""
        key = _tenant_key(_MOVE_PREFIX, tenant)
        with self._db.write() as session:
            row = session.get(MetaRow, key)
            if row is not None:
                move = _move_from(row.value)
                if move.target.same_model(target):
                    return move
                session.delete(row)
                session.flush()
            move = Move(tenant=tenant, target=target, chunks_done=0, chunks_total=0)
            session.add(MetaRow(key=key, value=_move_json(move)))
            return move

    def record_move_progress(self, move: Move) -> None:
        with self._db.write() as session:
            row = session.get(MetaRow, _tenant_key(_MOVE_PREFIX, move.tenant))
            if row is not None and _move_from(row.value).target.same_model(move.target):
                row.value = _move_json(move)

    def move_of(self, tenant: str) -> Move | None:
        with self._db.read() as session:
            row = session.get(MetaRow, _tenant_key(_MOVE_PREFIX, tenant))
            return None if row is None else _move_from(row.value)

    def moves(self) -> list[Move]:
        """Every move under way (a crash may have stopped them)."""
        with self._db.read() as session:
            rows = session.scalars(select(MetaRow).where(MetaRow.key.startswith(_MOVE_PREFIX)))
            return [_move_from(row.value) for row in rows]

    def tenants(self) -> list[str]:
        """Every tenant that holds a document."""
        with self._db.read() as session:
            return list(
                session.scalars(select(DocumentRow.tenant).distinct().order_by(DocumentRow.tenant))
            )

    def ready_chunks(self, tenant: str, after: str | None, limit: int) -> list[DocumentChunks]:
        """Up to ``limit`` of the tenant's ready documents by id after ``after``, each with the
        chunk rows of its current version."""
        query = select(DocumentRow).where(
            DocumentRow.tenant == tenant, DocumentRow.status == "ready"
        )
        if after is not None:
            query = query.where(DocumentRow.id > after)
        with self._db.read() as session:
            documents = list(session.scalars(query.order_by(DocumentRow.id).limit(limit)))
            chunks: dict[tuple[str, int], list[Chunk]] = {}
            if documents:
                rows = session.scalars(
                    select(ChunkRow)
                    .where(ChunkRow.document_id.in_([d.id for d in documents]))
                    .order_by(ChunkRow.chunk_index)
                )
                for row in rows:
                    chunks.setdefault((row.document_id, row.version), []).append(
                        chunk_from_row(row)
                    )
            return [
                DocumentChunks(
                    document_id=d.id,
                    version=d.version,
                    metadata=dict(d.metadata_),
                    chunks=chunks.get((d.id, d.version), []),
                )
                for d in documents
            ]

    def ready_chunk_count(self, tenant: str) -> int:
        """The chunks of the current versions of the tenant's ready documents."""
        with self._db.read() as session:
            total = session.scalar(
                select(func.coalesce(func.sum(DocumentRow.chunk_count), 0)).where(
                    DocumentRow.tenant == tenant, DocumentRow.status == "ready"
                )
            )
            return int(total or 0)

    def ready_version(self, tenant: str, document_id: str) -> int | None:
        """The current version of the tenant's document when it is ready, else None."""
        with self._db.read() as session:
            row = session.get(DocumentRow, document_id)
            if row is None or row.tenant != tenant or row.status != "ready":
                return None
            return row.version


def _move_json(move: Move) -> str:
    return json.dumps(
        {
            "tenant": move.tenant,
            "target": _space_facts(move.target),
            "chunks_done": move.chunks_done,
            "chunks_total": move.chunks_total,
        }
    )


def _move_from(value: str) -> Move:
    facts = json.loads(value)
    return Move(
        tenant=facts["tenant"],
        target=_space_from(facts["target"]),
        chunks_done=int(facts["chunks_done"]),
        chunks_total=int(facts["chunks_total"]),
    )


def spaces_of(current: Space, writing: Space) -> Sequence[Space]:
    """The spaces a tenant's vectors may be in: its current one, and the one writers fill."""
    return [current] if current.same_model(writing) else [current, writing]
