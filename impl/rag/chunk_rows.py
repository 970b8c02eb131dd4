"""The registry's chunk rows as the service reads them: pages of a document's chunks, chunks
by id, and the lexical index over them."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from sqlalchemy import bindparam, select

from impl.db import Database, decode_cursor, encode_cursor
from impl.errors import InvalidInput
from impl.rag import lexical
from impl.rag.tables import DELETING, ChunkRow, DocumentRow, chunk_from_row
from impl.rag.types import Chunk, Page, TermStatistics

# Every search reads its hits' texts here, so the statement is built once, on the table's
# columns: an ORM select built per call cost twice the CPU (293 against 146 us for 5 chunks).
_CHUNKS = ChunkRow.__table__.c
_CHUNKS_BY_ID = select(
    _CHUNKS.id,
    _CHUNKS.document_id,
    _CHUNKS.chunk_index,
    _CHUNKS.version,
    _CHUNKS.text,
    _CHUNKS.page,
    _CHUNKS.start_char,
    _CHUNKS.end_char,
).where(_CHUNKS.id.in_(bindparam("ids", expanding=True)), _CHUNKS.tenant == bindparam("tenant"))


class Chunks:
    """The registry's chunk rows, read (a part of ``Registry``; jobs write them)."""

    _db: Database

    def list_chunks(
        self, tenant: str, document_id: str, *, limit: int, cursor: str | None
    ) -> Page[Chunk] | None:
        """The document's chunk rows by index; None when the document is not the tenant's."""
        after = -1
        if cursor is not None:
            index = decode_cursor(cursor).get("n")
            if not isinstance(index, int) or isinstance(index, bool):
                raise InvalidInput("the cursor is not valid")
            after = index
        with self._db.read() as session:
            doc = session.get(DocumentRow, document_id)
            if doc is None or doc.tenant != tenant or doc.status == DELETING:
                return None
            rows = list(
                session.scalars(
                    select(ChunkRow)
                    .where(
                        ChunkRow.document_id == document_id,
                        ChunkRow.version == doc.version,
                        ChunkRow.chunk_index > after,
                    )
                    .order_by(ChunkRow.chunk_index)
                    .limit(limit + 1)
                )
            )
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor({"n": rows[-1].chunk_index})
        return Page(items=[chunk_from_row(row) for row in rows], next_cursor=next_cursor)

    def get_chunks(self, tenant: str, chunk_ids: Sequence[str]) -> dict[str, Chunk]:
        """The tenant's chunks of these ids, by id."""
        if not chunk_ids:
            return {}
        with self._db.read() as session:
            rows = session.execute(_CHUNKS_BY_ID, {"ids": list(set(chunk_ids)), "tenant": tenant})
            return {row.id: chunk_from_row(row) for row in rows}

    def lexical_search(
        self,
        tenant: str,
        query: str,
        *,
        limit: int,
        document_ids: Collection[str] | None,
        exclude_documents: Collection[str],
        only_versions: Mapping[str, int],
    ) -> list[lexical.LexicalHit]:
        with self._db.read() as session:
            return lexical.search(
                session,
                tenant,
                query,
                limit=limit,
                document_ids=document_ids,
                exclude_documents=exclude_documents,
                only_versions=only_versions,
            )

    def term_statistics(self, tenant: str, terms: Collection[str]) -> TermStatistics:
        with self._db.read() as session:
            return lexical.term_statistics(session, tenant, terms)
