"""Service values to generated response models and request models to service values."""

from __future__ import annotations

from pydantic import MISSING, BaseModel

from generated import models
from impl.api.problems import TYPE_PREFIX
from impl.rag import types
from impl.rag.events import Event
from impl.rag.spaces import TenantIndex


def document(value: types.Document) -> models.Document:
    return models.Document.model_validate(value, from_attributes=True)


def job_error(value: types.JobError | None) -> models.Problem | None:
    if value is None:
        return None
    return models.Problem(
        type=f"{TYPE_PREFIX}ingestion-failed", title=value.title, status=422, detail=value.detail
    )


def job(value: types.Job) -> models.Job:
    fields = {k: v for k, v in vars(value).items() if k != "error"}
    return models.Job.model_validate({**fields, "error": job_error(value.error)})


def job_event(value: Event) -> models.JobEvent:
    """An event of the log; a ``job.finished``'s error, kept as title and detail, becomes the
    problem that the job's own ``error`` is."""
    data = dict(value.data)
    if data.get("error") is not None:
        data["error"] = job_error(types.JobError(**data["error"]))
    return models.JobEvent.model_validate(
        {
            "id": value.id,
            "type": value.type,
            "job_id": value.job_id,
            "document_id": value.document_id,
            "created_at": value.created_at,
            "data": data,
        }
    )


def chunk(value: types.Chunk) -> models.Chunk:
    return models.Chunk.model_validate(value, from_attributes=True)


def metadata(value: models.Metadata | MISSING) -> types.Metadata:
    if value is MISSING:
        return {}
    return {key: scalar(item) for key, item in value.root.items()}


def scalar(value: models.MetadataValue) -> types.MetadataValue:
    root = value.root
    return root.root if isinstance(root, BaseModel) else root


def filters(value: models.SearchFilters | MISSING) -> types.SearchFilters | None:
    if value is MISSING:
        return None
    conditions: dict[str, types.MetadataValue | list[types.MetadataValue] | types.MetadataRange]
    conditions = {}
    for key, condition in (value.metadata if value.metadata is not MISSING else {}).items():
        root = condition.root
        if isinstance(root, models.MetadataIn):
            conditions[key] = [scalar(v) for v in root.in_]
        elif isinstance(root, models.MetadataRange):
            # MISSING bounds are left out; the store refuses a range with none.
            conditions[key] = types.MetadataRange(**root.model_dump())
        else:
            conditions[key] = scalar(root)
    document_ids = None
    if value.document_ids is not MISSING:
        document_ids = [d.root for d in value.document_ids]
    return types.SearchFilters(document_ids=document_ids, metadata=conditions)


def search_result(hit: types.SearchHit) -> models.SearchResult:
    return models.SearchResult(
        document_id=hit.chunk.document_id,
        document_title=hit.document_title,
        chunk_id=hit.chunk.id,
        chunk_index=hit.chunk.index,
        text=hit.chunk.text,
        score=hit.score,
        explain=models.SearchExplain.model_validate(
            {name: vars(found) for name, found in hit.explain.items()}
        ),
        page=hit.chunk.page,
        start_char=hit.chunk.start_char,
        end_char=hit.chunk.end_char,
    )


def retrieval(value: models.Retrieval | MISSING) -> types.RetrievalOptions:
    """The request's retrieval options; what it leaves out takes the contract's defaults,
    which are RetrievalOptions' own."""
    if value is MISSING:
        return types.RetrievalOptions()
    weights = value.weights if value.weights is not MISSING else models.RetrievalWeights()
    return types.RetrievalOptions(
        mode=value.mode,
        dense_weight=weights.dense,
        lexical_weight=weights.lexical,
        rrf_k=value.rrf_k,
        candidates=value.candidates,
    )


def tenant_index(value: TenantIndex) -> models.TenantIndex:
    current, move = value.current, value.move
    return models.TenantIndex(
        embedding_model=models.EmbeddingSpace(
            model_id=current.model_id, dimension=current.dimension
        ),
        moving_to=None
        if move is None
        else models.EmbeddingMove(
            model_id=move.target.model_id,
            dimension=move.target.dimension,
            chunks_done=move.chunks_done,
            chunks_total=move.chunks_total,
        ),
        job=None if value.job is None else job(value.job),
    )
