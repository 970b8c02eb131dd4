"""The vector store: Chroma, one collection per tenant and embedding model.

A collection per tenant keeps every search free of a tenant filter (a where filter measured 28x
slower at 100k vectors) and makes a tenant's vectors impossible to reach from another. The
embedded client (``<data_dir>/chroma``) serves one process only: Chroma's embedded mode is not
process-safe. Several processes share a Chroma server (``chroma_url``) instead.

Vectors are always given explicitly: a collection never gets an embedding function, so Chroma
never loads (or downloads) a model of its own. A vector carries only what searches filter on
(its document, version and the user's metadata): the chunk's text and place are the registry's,
read for the hits a search keeps. Texts in Chroma too cost its server a full-text index entry
per chunk (about 1.1 ms of CPU a chunk, docs/benchmarks.md, "Worker scaling"). Which model's
collection answers a tenant's searches, and which one writers fill, is the registry's to say
(spaces.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import operator
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Collection as AbstractSet
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import chromadb
import httpx
import numpy as np
from chromadb.api.client import Client
from chromadb.api.models.Collection import Collection
from chromadb.config import Settings as ChromaSettings
from chromadb.errors import NotFoundError

from impl.dependencies import Dependency
from impl.errors import ConfigurationError, InvalidInput, ServiceUnavailable
from impl.rag.spaces import Space, spaces_of
from impl.rag.types import Chunk, Metadata, MetadataRange, MetadataValue, SearchFilters
from impl.settings import Settings

# Our own keys on every vector, and the prefix that keeps the user's metadata keys from ever
# colliding with them.
DOCUMENT_ID = "document_id"
# The document's version the vector belongs to. Vectors written before versions existed lack
# it: they are version 1, and Chroma's $ne and $nin match a missing key.
VERSION = "version"
USER_PREFIX = "m_"
_MODEL_KEY = "ragapi_model_id"
_DIMENSION_KEY = "ragapi_dimension"
_TENANT_KEY = "ragapi_tenant"  # the tenant's hash, so a tenant's collections can be listed
_COLLECTION_PREFIX = "ragapi-tenant-"

# The contract's bounds on metadata (openapi/v1.yaml, Metadata), enforced here too so that the
# CLI and other in-process callers get the same answers as the API's clients.
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_METADATA_KEYS = 32
_MAX_METADATA_STRING = 512


def _tenant_hash(tenant: str) -> str:
    return hashlib.sha256(tenant.encode()).hexdigest()[:40]


def collection_name(tenant: str, space: Space | None = None) -> str:
    """A valid Chroma collection name for any tenant id and model: a hash, so no tenant id can
    make an invalid name or another tenant's. The default space's is the tenant's alone."""
    if space is None or space.default:
        return _COLLECTION_PREFIX + _tenant_hash(tenant)
    named = f"{tenant}\x1f{space.model_id}|{space.dimension}"
    return _COLLECTION_PREFIX + hashlib.sha256(named.encode()).hexdigest()[:40]


class SpaceBook(Protocol):
    """Where the registry says a tenant's vectors are (impl/rag/spaces.py)."""

    def current_space(self, tenant: str) -> Space: ...

    def switch_space(self, tenant: str, space: Space) -> None: ...


def chroma_settings() -> ChromaSettings:
    return ChromaSettings(anonymized_telemetry=False)


_INT64 = range(-(2**63), 2**63)


def _stored(value: MetadataValue) -> MetadataValue:
    """The value as Chroma can hold it: an integer past 64 bits as the float of the same JSON
    number (Chroma refuses such an integer, in a where clause as in a record)."""
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        return float(value)
    return value


def validate_metadata(metadata: Metadata) -> None:
    """Keys Chroma can filter on and values it can store; raises InvalidInput naming the key."""
    if len(metadata) > _MAX_METADATA_KEYS:
        raise InvalidInput(f"metadata may hold at most {_MAX_METADATA_KEYS} keys")
    for key, value in metadata.items():
        _check_key(key)
        if isinstance(value, str):
            if len(value) > _MAX_METADATA_STRING:
                raise InvalidInput(
                    f"metadata value of {key!r} is longer than {_MAX_METADATA_STRING} characters"
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise InvalidInput(f"metadata value of {key!r} must be a finite number")
        elif not isinstance(value, (bool, int)):
            raise InvalidInput(f"metadata value of {key!r} must be a string, number or boolean")


def _check_key(key: str) -> None:
    if not _METADATA_KEY.fullmatch(key):
        raise InvalidInput(f"metadata key {key!r} must be 1 to 64 letters, digits, '_', '.' or '-'")


@dataclass(frozen=True)
class DenseHit:
    """A nearest chunk without its text: what fusion needs of it."""

    chunk_id: str
    document_id: str
    version: int
    score: float  # 1 - cosine distance: cosine similarity, higher is closer


def _connect(settings: Settings) -> Client:
    if settings.chroma_url is None:
        path = settings.data_dir / "chroma"
        path.mkdir(parents=True, exist_ok=True)
        # The factories are typed as the ClientAPI interface; both build a Client (which closes).
        return cast(Client, chromadb.PersistentClient(path=str(path), settings=chroma_settings()))
    url = urlsplit(settings.chroma_url)
    try:
        port = url.port
    except ValueError:
        port = -1
    if url.scheme not in ("http", "https") or not url.hostname or port == -1:
        raise ConfigurationError("RAGAPI_CHROMA_URL must look like http://host:8000")
    if url.path not in ("", "/"):
        raise ConfigurationError("RAGAPI_CHROMA_URL must name a server root, without a path")
    ssl = url.scheme == "https"
    port = port or (443 if ssl else 8000)
    timeout = httpx.Timeout(settings.chroma_timeout_seconds)
    try:
        # The client asks the server for its tenant while being built, with no time limit: a
        # server that hangs would hang the start, so it must answer a heartbeat in time first.
        httpx.get(
            f"{url.scheme}://{url.hostname}:{port}/api/v2/heartbeat", timeout=timeout
        ).raise_for_status()
        client = cast(
            Client,
            chromadb.HttpClient(host=url.hostname, port=port, ssl=ssl, settings=chroma_settings()),
        )
    except Exception as exc:
        raise ServiceUnavailable("the Chroma server could not be reached") from exc
    # chromadb builds its httpx session with no timeout and offers no setting for one
    # (chroma-core/chroma#5805): set it on the session, and fail at start, not by hanging, if
    # a chromadb upgrade moves it.
    session = getattr(getattr(client, "_server", None), "_session", None)
    if not isinstance(session, httpx.Client):
        client.close()
        raise RuntimeError("this chromadb's HTTP client has no session to give a timeout")
    session.timeout = timeout
    return client


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _reaching(
    method: Callable[Concatenate[VectorStore, _P], _R],
) -> Callable[Concatenate[VectorStore, _P], _R]:
    """A Chroma server that cannot be reached is the vector store being down: the method is
    tried once more on a new connection (one the server dropped when it restarted costs a
    retry, not a failed request; every call here is idempotent), then DependencyUnavailable.
    One that does not answer within RAGAPI_CHROMA_TIMEOUT_SECONDS is down at once.
    The embedded client makes no connections, so this never fires for it."""

    def reaching(self: VectorStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            try:
                result = method(self, *args, **kwargs)
            except httpx.TimeoutException:
                raise  # a server too slow to answer once is no faster on a second try
            except httpx.TransportError:
                result = method(self, *args, **kwargs)
        except httpx.TransportError as exc:
            raise self.dependency.failed(exc) from None
        self.dependency.answered()
        return result

    return reaching


class VectorStore:
    """Thread-safe: one Chroma client shared by all threads, collection handles cached.

    Writes (``add``, ``count``) go to the collection of the model this store embeds with;
    removals and metadata changes to each collection of the tenant that may hold the vectors;
    searches to the space the caller embedded its question for. Without ``spaces`` (a store
    used on its own) every tenant is in the default space of this store's model."""

    def __init__(
        self,
        settings: Settings,
        model_id: str,
        dimension: int,
        spaces: SpaceBook | None = None,
    ) -> None:
        self._model = Space(model_id, dimension)
        self._spaces = spaces
        self._ef_search = settings.hnsw_ef_search
        self._configuration: dict[str, Any] = {
            "hnsw": {
                "space": "cosine",
                # Chroma's default ef_search measured poor top-5 recall at 100k vectors.
                "ef_search": self._ef_search,
                "ef_construction": settings.hnsw_ef_construction,
                "max_neighbors": settings.hnsw_m,
            }
        }
        where = settings.chroma_url or f"embedded Chroma in {settings.data_dir / 'chroma'}"
        self.dependency = Dependency("vector store", f"vector store {where}")
        self._client = _connect(settings)
        self._collections: dict[str, Collection] = {}
        # Each tenant's current space as last read from the registry: a search starts from it
        # without a registry read (see ``search_space``).
        self._search_spaces: dict[str, Space] = {}
        self._lock = threading.Lock()
        try:
            self._batch = self._client.get_max_batch_size()
        except BaseException:
            # An embedded client left open keeps Chroma's files open for the whole process.
            self._client.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._collections.clear()
            self._search_spaces.clear()
        self._client.close()

    @_reaching
    def heartbeat(self) -> None:
        self._client.heartbeat()

    def spaces(self, tenant: str) -> tuple[Space, Space]:
        """The tenant's current space (its searches') and the one this store writes into."""
        if self._spaces is None:
            default = Space(self._model.model_id, self._model.dimension, default=True)
            return default, default
        current = self._spaces.current_space(tenant)
        if not current.same_model(self._model) and not self._holds_space(tenant, current):
            # The tenant holds no vectors of the old model: nothing to move, so it switches
            # now, and its first documents answer at once.
            self._spaces.switch_space(tenant, self._model)
            current = self._model
        with self._lock:
            self._search_spaces[tenant] = current
        return current, current if current.same_model(self._model) else self._model

    def search_space(self, tenant: str) -> Space:
        """The tenant's current space as this process last read it (``spaces``), without
        reading the registry again: a search's registry read cost as much CPU as its dense
        retrieval's ranking. A move that another process switched is seen when the old space's
        collection is gone, which the move's last step makes it right after the switch: a
        search that finds no collection calls ``spaces`` (``VectorIndex.nearest``), and the
        searches before that read the old space as if they had read the registry just before
        the switch."""
        with self._lock:
            remembered = self._search_spaces.get(tenant)
        return remembered if remembered is not None else self.spaces(tenant)[0]

    # Only what asks the server is reaching it: a call answered from the registry alone would
    # report the store as back while it is down (and the next call as down again).
    @_reaching
    def _holds_space(self, tenant: str, space: Space) -> bool:
        return self._collection(tenant, space, create=False) is not None

    @staticmethod
    def _check_model(collection: Collection, space: Space) -> None:
        """Vectors of two models live in different spaces: mixing them would silently return
        nonsense, so a collection holding another model's vectors than its space's is refused."""
        metadata = collection.metadata or {}
        model_id, dimension = metadata.get(_MODEL_KEY), metadata.get(_DIMENSION_KEY)
        if (model_id, dimension) != (space.model_id, space.dimension):
            raise ConfigurationError(
                f"the vector store was built with model {model_id} ({dimension} dimensions) "
                f"where the registry expects {space.describe()}; re-index (`ragapi reindex`) "
                "or use a new data_dir"
            )

    def _collection(self, tenant: str, space: Space, *, create: bool) -> Collection | None:
        name = collection_name(tenant, space)
        with self._lock:
            collection = self._collections.get(name)
            if collection is not None:
                return collection
            if create:
                collection = self._client.get_or_create_collection(
                    name,
                    configuration=cast(Any, self._configuration),
                    metadata={
                        _MODEL_KEY: space.model_id,
                        _DIMENSION_KEY: space.dimension,
                        _TENANT_KEY: _tenant_hash(tenant),
                    },
                    embedding_function=None,
                )
            else:
                # Reads and deletes never create: a tenant that only searches costs nothing.
                try:
                    collection = self._client.get_collection(name, embedding_function=None)
                except NotFoundError:
                    return None
            self._check_model(collection, space)
            hnsw = collection.configuration.get("hnsw") or {}
            if hnsw.get("ef_search") != self._ef_search:
                # ef_search is read at query time, so collections made under other settings
                # follow the current ones; ef_construction and max_neighbors stay as built.
                collection.modify(configuration={"hnsw": {"ef_search": self._ef_search}})
            self._collections[name] = collection
            return collection

    def _holding(self, tenant: str) -> list[Collection]:
        """The tenant's collections that may hold a vector of it: the current space's, and
        during a move the one being filled."""
        found = (
            self._collection(tenant, space, create=False)
            for space in spaces_of(*self.spaces(tenant))
        )
        return [collection for collection in found if collection is not None]

    def _forget(self, name: str) -> None:
        with self._lock:
            self._collections.pop(name, None)

    @_reaching
    def drop_other_spaces(self, tenant: str, keep: Space) -> None:
        """Delete the tenant's collections other than ``keep``'s: a move's last step, after the
        switch (again after a crash)."""
        kept = collection_name(tenant, keep)
        default = collection_name(tenant)
        with self._lock:
            self._search_spaces.pop(tenant, None)
        for collection in self._client.list_collections():
            ours = collection.name == default or (collection.metadata or {}).get(
                _TENANT_KEY
            ) == _tenant_hash(tenant)
            if ours and collection.name != kept:
                self._forget(collection.name)
                with contextlib.suppress(NotFoundError):  # another process dropped it first
                    self._client.delete_collection(collection.name)

    @_reaching
    def add(
        self,
        tenant: str,
        chunks: Sequence[Chunk],
        vectors: Sequence[Sequence[float]],
        metadata: Mapping[str, Metadata],
    ) -> None:
        """Write the chunks' vectors, each with its document's user ``metadata`` (by document
        id); writing the same chunk ids again replaces them."""
        collection = self._collection(tenant, self.spaces(tenant)[1], create=True)
        assert collection is not None
        user = {
            document_id: {USER_PREFIX + key: _stored(value) for key, value in values.items()}
            for document_id, values in metadata.items()
        }
        for start in range(0, len(chunks), self._batch):
            part = chunks[start : start + self._batch]
            metadatas = [
                {**user[chunk.document_id], DOCUMENT_ID: chunk.document_id, VERSION: chunk.version}
                for chunk in part
            ]
            collection.upsert(
                ids=[chunk.id for chunk in part],
                embeddings=np.asarray(vectors[start : start + self._batch], dtype=np.float32),
                metadatas=cast(Any, metadatas),
            )

    @_reaching
    def count(self, tenant: str, chunk_ids: Sequence[str]) -> int:
        """How many of these chunks have a vector where this store writes; looked up by id,
        so no scan."""
        collection = self._collection(tenant, self.spaces(tenant)[1], create=False)
        if collection is None:
            return 0
        return len(collection.get(ids=list(chunk_ids), include=[])["ids"])

    @_reaching
    def set_metadata(self, tenant: str, document_id: str, metadata: Metadata) -> None:
        """Give every vector of the document (of every version) this user metadata, in place:
        nothing is embedded again."""
        user = {USER_PREFIX + key: _stored(value) for key, value in metadata.items()}
        for collection in self._holding(tenant):
            found = collection.get(
                where=cast(Any, {DOCUMENT_ID: document_id}), include=["metadatas"]
            )
            ids, metadatas = found["ids"], found["metadatas"] or []
            for start in range(0, len(ids), self._batch):
                changed = []
                for meta in metadatas[start : start + self._batch]:
                    ours = {k: v for k, v in meta.items() if not k.startswith(USER_PREFIX)}
                    # A key the patch removed is given as None, which Chroma's update deletes.
                    gone = {k: None for k in meta if k.startswith(USER_PREFIX) and k not in user}
                    changed.append({**ours, **gone, **user})
                collection.update(
                    ids=ids[start : start + self._batch], metadatas=cast(Any, changed)
                )

    @_reaching
    def delete_version(self, tenant: str, document_id: str, version: int) -> None:
        """Remove the vectors one version of a document was given (a replacement's: they always
        carry their version)."""
        where = {"$and": [{DOCUMENT_ID: document_id}, {VERSION: version}]}
        for collection in self._holding(tenant):
            collection.delete(where=cast(Any, where))

    @_reaching
    def delete_chunks(self, tenant: str, chunk_ids: Sequence[str]) -> None:
        """Remove these vectors, by id (no scan)."""
        if chunk_ids:
            for collection in self._holding(tenant):
                collection.delete(ids=list(chunk_ids))

    @_reaching
    def delete_documents(self, tenant: str, document_ids: Sequence[str]) -> None:
        """Remove every vector of these documents, whatever run of which job wrote it. Each
        call scans the collection's metadata, so callers pass all their documents at once."""
        if document_ids:
            for collection in self._holding(tenant):
                collection.delete(where=cast(Any, {DOCUMENT_ID: {"$in": list(document_ids)}}))

    def _searched(
        self, tenant: str, space: Space | None, run: Callable[[Collection], _R]
    ) -> _R | None:
        """``run`` on the space's collection; None when there is none (anymore: a move's last
        step drops the old one, maybe after this caller read the registry, and then the
        tenant's space is read again by the next ``search_space``)."""
        if space is None:
            space = self.spaces(tenant)[0]
        collection = self._collection(tenant, space, create=False)
        if collection is not None:
            try:
                return run(collection)
            except NotFoundError:
                self._forget(collection.name)
        with self._lock:
            if self._search_spaces.get(tenant) == space:
                del self._search_spaces[tenant]
        return None

    @_reaching
    def nearest(
        self,
        tenant: str,
        vector: Sequence[float],
        top_k: int,
        filters: SearchFilters | None,
        exclude_documents: AbstractSet[str] = frozenset(),
        only_versions: Mapping[str, int] | None = None,
        *,
        space: Space | None = None,
    ) -> list[DenseHit]:
        """The ``top_k`` nearest chunks that pass ``filters``, closest first, as ids and scores:
        of the documents in ``only_versions``, only that version's. ``vector``: the question
        embedded by the model of ``space`` (None: the tenant's current space). Only ids and
        distances are read: results' metadata cost most of a wide query (hybrid asks for 50
        candidates and keeps a few): 5.6 ms of CPU against 3.4 ms for 50 at 10k chunks."""
        if filters is not None and filters.document_ids is not None and not filters.document_ids:
            return []
        where = build_where(filters, exclude_documents, only_versions or {})
        result = self._searched(
            tenant,
            space,
            lambda collection: collection.query(
                query_embeddings=np.asarray([vector], dtype=np.float32),
                n_results=top_k,
                where=cast(Any, where),
                include=["distances"],
            ),
        )
        if result is None:
            return []
        distances = (result["distances"] or [[]])[0]
        return [
            DenseHit(chunk_id, *_document_and_version(chunk_id), 1.0 - float(distance))
            for chunk_id, distance in zip(result["ids"][0], distances, strict=True)
        ]


def _document_and_version(chunk_id: str) -> tuple[str, int]:
    """The document and version a chunk id names (jobs.chunk_id): the document's id, which
    holds no "-", then "-v<version>" for versions after the first, then "-<index>"."""
    parts = chunk_id.split("-")
    return parts[0], int(parts[1].removeprefix("v")) if len(parts) == 3 else 1


def build_where(
    filters: SearchFilters | None,
    exclude_documents: AbstractSet[str] = frozenset(),
    only_versions: Mapping[str, int] | None = None,
) -> dict[str, Any] | None:
    """Chroma's where clause for the filters: equality for a value, ``$in`` for a list,
    ``$gt``/``$gte``/``$lt``/``$lte`` for a range, all joined with ``$and``; the documents of
    ``exclude_documents`` left out, and of those of ``only_versions`` every other version."""
    clauses: list[dict[str, Any]] = []
    if filters is not None and filters.document_ids is not None:
        clauses.append({DOCUMENT_ID: {"$in": list(dict.fromkeys(filters.document_ids))}})
    if exclude_documents:
        clauses.append({DOCUMENT_ID: {"$nin": sorted(exclude_documents)}})
    for document_id, version in sorted((only_versions or {}).items()):
        # Version 1 may be a vector written before versions existed, without the key: it is
        # kept by "not any later version" ($nin matches a missing key), later ones by equality.
        # Versions above the current one are at most the next one, being indexed.
        wanted = {"$eq": version} if version > 1 else {"$nin": [version + 1]}
        clauses.append({"$or": [{DOCUMENT_ID: {"$ne": document_id}}, {VERSION: wanted}]})
    for key, condition in (filters.metadata if filters is not None else {}).items():
        _check_key(key)
        field = USER_PREFIX + key
        if isinstance(condition, MetadataRange):
            bounds = {
                "$gt": condition.gt,
                "$gte": condition.gte,
                "$lt": condition.lt,
                "$lte": condition.lte,
            }
            given = {op: _stored(value) for op, value in bounds.items() if value is not None}
            if not given:
                raise InvalidInput(f"metadata filter {key!r}: a range needs at least one bound")
            # Chroma takes one operator per field, so each bound is a clause of its own.
            clauses.extend({field: {op: value}} for op, value in given.items())
        elif isinstance(condition, list):
            if not condition:
                raise InvalidInput(f"metadata filter {key!r}: the list of values is empty")
            groups = _by_type([_stored(value) for value in condition])
            # Chroma's $in takes values of one type, so a mixed list is one $in per type.
            alternatives = [{field: {"$in": group}} for group in groups]
            clauses.append(alternatives[0] if len(alternatives) == 1 else {"$or": alternatives})
        else:
            clauses.append({field: {"$eq": _stored(condition)}})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def _same_value(stored: MetadataValue, wanted: MetadataValue) -> bool:
    """JSON equality: numbers by value whatever their Python type, booleans only as
    booleans (Python would take True for 1)."""
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return type(stored) is type(wanted) and stored == wanted
    if isinstance(stored, str) or isinstance(wanted, str):
        return type(stored) is type(wanted) and stored == wanted
    return stored == wanted


def admits(filters: SearchFilters, metadata: Metadata) -> bool:
    """Whether a document's metadata meets the filters' metadata conditions, evaluated as
    ``build_where`` asks Chroma to (for the lexical index, which keeps no metadata)."""
    for key, condition in filters.metadata.items():
        if key not in metadata:
            return False
        stored = metadata[key]
        if isinstance(condition, MetadataRange):
            if isinstance(stored, bool) or not isinstance(stored, int | float):
                return False
            bounds = (
                (condition.gt, operator.gt),
                (condition.gte, operator.ge),
                (condition.lt, operator.lt),
                (condition.lte, operator.le),
            )
            if not all(test(stored, bound) for bound, test in bounds if bound is not None):
                return False
        elif isinstance(condition, list):
            if not any(_same_value(stored, value) for value in condition):
                return False
        elif not _same_value(stored, condition):
            return False
    return True


def _by_type(values: list[MetadataValue]) -> list[list[MetadataValue]]:
    """The values grouped by JSON type. Numbers compare by value whatever their Python type,
    so ints and floats form one group, as floats when they mix."""
    groups: dict[type, list[MetadataValue]] = {}
    for value in values:
        kind = float if type(value) in (int, float) else type(value)
        groups.setdefault(kind, []).append(value)
    numbers = groups.get(float, [])
    if len({type(v) for v in numbers}) > 1:
        groups[float] = [float(v) for v in numbers]
    return list(groups.values())
