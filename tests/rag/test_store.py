"""The stores: Chroma, embedded and as a server (collections per tenant, their HNSW
configuration, batched writes, filters, deletes, the model identity check), and the store of
originals."""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

from impl.errors import ConfigurationError, InvalidInput, ServiceUnavailable
from impl.rag.registry import Registry
from impl.rag.store import VectorStore, build_where, collection_name
from impl.rag.types import Chunk, Metadata, MetadataRange, SearchFilters
from tests.conftest import chroma_server, free_port
from tests.rag.conftest import folder_store, make_settings

DIM = 4


def unit(*values: float) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def chunks_of(document_id: str, count: int) -> list[Chunk]:
    return [
        Chunk(f"{document_id}-{i}", document_id, i, f"{document_id} text {i}", None, i, i + 1)
        for i in range(count)
    ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[VectorStore]:
    store = VectorStore(make_settings(tmp_path / "data"), "model-a", DIM)
    yield store
    store.close()


def add_document(
    store: VectorStore,
    tenant: str,
    document_id: str,
    vector: list[float],
    metadata: Metadata | None = None,
) -> None:
    store.add(tenant, chunks_of(document_id, 1), [vector], {document_id: metadata or {}})


def found_documents(
    store: VectorStore, tenant: str, filters: SearchFilters | None, top_k: int = 10
) -> set[str]:
    hits = store.nearest(tenant, unit(1, 0, 0, 0), top_k, filters)
    return {hit.document_id for hit in hits}


def test_collection_names_are_valid_and_distinct_for_any_tenant(store: VectorStore) -> None:
    tenants = ["acme", "ACME", "a/b", "../..", "x" * 300, "ünïcode tenant", "", "1.2.3.4"]
    names = {collection_name(tenant) for tenant in tenants}
    assert len(names) == len(tenants)
    for tenant in tenants:
        add_document(store, tenant, "doc", unit(1, 0, 0, 0))
        [hit] = store.nearest(tenant, unit(1, 0, 0, 0), 5, None)
        assert hit.document_id == "doc"


def test_collections_get_the_configured_hnsw_settings(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path / "data", hnsw_ef_search=123, hnsw_ef_construction=77, hnsw_m=12
    )
    store = VectorStore(settings, "model-a", DIM)
    try:
        add_document(store, "t", "doc", unit(1, 0, 0, 0))
        collection = store._collection("t", store.spaces("t")[0], create=False)
        assert collection is not None
        hnsw = collection.configuration["hnsw"]
        assert hnsw is not None
        assert hnsw["space"] == "cosine"
        assert (hnsw["ef_search"], hnsw["ef_construction"], hnsw["max_neighbors"]) == (123, 77, 12)
        assert collection.configuration["embedding_function"] is None
    finally:
        store.close()


def test_existing_collections_follow_the_configured_ef_search(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = VectorStore(make_settings(data_dir, hnsw_ef_search=100), "model-a", DIM)
    add_document(store, "t", "doc", unit(1, 0, 0, 0))
    store.close()
    store = VectorStore(make_settings(data_dir, hnsw_ef_search=300, hnsw_m=8), "model-a", DIM)
    try:
        assert len(store.nearest("t", unit(1, 0, 0, 0), 5, None)) == 1
        collection = store._collection("t", store.spaces("t")[0], create=False)
        assert collection is not None
        hnsw = collection.configuration["hnsw"]
        assert hnsw is not None
        assert hnsw["ef_search"] == 300
        assert hnsw["max_neighbors"] == 32  # fixed when the index was built
        assert collection.metadata is not None
        assert collection.metadata["ragapi_model_id"] == "model-a"
        assert collection.metadata["ragapi_dimension"] == DIM
    finally:
        store.close()


def test_nearest_scores_are_cosine_similarity_best_first(store: VectorStore) -> None:
    add_document(store, "t", "same", unit(1, 0, 0, 0))
    add_document(store, "t", "near", unit(1, 1, 0, 0))
    add_document(store, "t", "opposite", unit(-1, 0, 0, 0))
    hits = store.nearest("t", unit(1, 0, 0, 0), 3, None)
    assert [hit.document_id for hit in hits] == ["same", "near", "opposite"]
    assert [round(hit.score, 4) for hit in hits] == [1.0, round(math.sqrt(0.5), 4), -1.0]
    assert hits[0].chunk_id == chunks_of("same", 1)[0].id


def stored(store: VectorStore, tenant: str, document_id: str, count: int) -> int:
    """How many of the first `count` chunks of the document have a vector."""
    return store.count(tenant, [chunk.id for chunk in chunks_of(document_id, count)])


def test_writes_larger_than_chromas_batch_limit_are_split(store: VectorStore) -> None:
    count = store._client.get_max_batch_size() + 100
    vectors = [unit(1, i, 0, 1) for i in range(count)]
    store.add("t", chunks_of("big", count), vectors, {"big": {}})
    assert stored(store, "t", "big", count + 5) == count
    # Writing the same chunks again replaces them rather than adding more.
    store.add("t", chunks_of("big", 10), vectors[:10], {"big": {}})
    assert store._client.get_collection(collection_name("t")).count() == count
    store.delete_documents("t", ["big"])
    assert stored(store, "t", "big", count) == 0


def test_delete_removes_those_documents_in_one_tenant(store: VectorStore) -> None:
    store.add("t", chunks_of("a", 3), [unit(1, 0, 0, 0)] * 3, {"a": {}})
    store.add("t", chunks_of("b", 2), [unit(1, 0, 0, 0)] * 2, {"b": {}})
    store.add("t", chunks_of("c", 4), [unit(1, 0, 0, 0)] * 4, {"c": {}})
    store.add("u", chunks_of("a", 1), [unit(1, 0, 0, 0)], {"a": {}})
    store.delete_documents("t", ["a", "c", "never-stored"])
    left = {(tenant, doc): stored(store, tenant, doc, 4) for tenant in "tu" for doc in "abc"}
    assert left == {
        ("t", "a"): 0,
        ("t", "b"): 2,
        ("t", "c"): 0,
        ("u", "a"): 1,
        ("u", "b"): 0,
        ("u", "c"): 0,
    }


def test_reads_do_not_create_collections(store: VectorStore) -> None:
    assert store.nearest("nobody", unit(1, 0, 0, 0), 5, None) == []
    assert stored(store, "nobody", "doc", 1) == 0
    store.delete_documents("nobody", ["doc"])
    names = {collection.name for collection in store._client.list_collections()}
    assert collection_name("nobody") not in names


def test_metadata_filters(store: VectorStore) -> None:
    add_document(store, "t", "a", unit(1, 0, 0, 0), {"team": "red", "year": 2020, "pub": True})
    add_document(store, "t", "b", unit(1, 0.1, 0, 0), {"team": "blue", "year": 2022, "pub": False})
    add_document(store, "t", "c", unit(1, 0.2, 0, 0), {"team": "red", "year": 2024, "score": 0.5})

    def found(**conditions: object) -> set[str]:
        return found_documents(store, "t", SearchFilters(metadata=conditions))  # type: ignore[arg-type]

    assert found(team="red") == {"a", "c"}
    assert found(pub=True) == {"a"}
    assert found(year=2022) == {"b"}
    assert found(team=["blue", "green"]) == {"b"}
    assert found(year=[2020, 2024.0]) == {"a", "c"}  # ints and floats mix in one list
    # A mixed list is one $in per JSON type; "2022" the string is not 2022 the number.
    assert found(year=["2022", 2020]) == {"a"}
    assert found(pub=[True, "yes", 7]) == {"a"}
    assert found(year=MetadataRange(gte=2022)) == {"b", "c"}
    assert found(year=MetadataRange(gt=2020, lt=2024)) == {"b"}
    assert found(year=MetadataRange(lte=2022.5)) == {"a", "b"}
    assert found(score=MetadataRange(gt=0.1)) == {"c"}
    assert found(team="red", year=MetadataRange(gt=2021)) == {"c"}
    assert found(missing="x") == set()
    by_id = SearchFilters(document_ids=["a", "b"], metadata={"team": "red"})
    assert found_documents(store, "t", by_id) == {"a"}
    assert found_documents(store, "t", SearchFilters(document_ids=[])) == set()


def test_user_metadata_cannot_collide_with_ours(store: VectorStore) -> None:
    add_document(store, "t", "real", unit(1, 0, 0, 0), {"document_id": "fake", "chunk_index": 9})
    [hit] = store.nearest("t", unit(1, 0, 0, 0), 5, None)
    assert hit.chunk_id == "real-0"
    assert found_documents(store, "t", SearchFilters(metadata={"document_id": "fake"})) == {"real"}
    store.delete_documents("t", ["fake"])
    assert stored(store, "t", "real", 1) == 1


def test_exclusions_join_the_filters() -> None:
    where = build_where(SearchFilters(document_ids=["a"], metadata={"k": 1}), {"x", "y"})
    assert where == {
        "$and": [
            {"document_id": {"$in": ["a"]}},
            {"document_id": {"$nin": ["x", "y"]}},
            {"m_k": {"$eq": 1}},
        ]
    }
    assert build_where(None) is None
    assert build_where(SearchFilters(metadata={"k": "v"})) == {"m_k": {"$eq": "v"}}


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"k": []}, "list of values is empty"),
        ({"k": MetadataRange()}, "at least one bound"),
        ({"bad key": 1}, "metadata key"),
        ({"$where": 1}, "metadata key"),
    ],
)
def test_invalid_filters_are_refused(metadata: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        build_where(SearchFilters(metadata=metadata))  # type: ignore[arg-type]


def test_a_collection_holding_another_models_vectors_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data")
    store = VectorStore(settings, "model-a", DIM)
    add_document(store, "t", "doc", unit(1, 0, 0, 0))
    store.close()
    for model_id, dimension in (("model-b", DIM), ("model-a", 8)):
        other = VectorStore(settings, model_id, dimension)
        with pytest.raises(ConfigurationError) as caught:
            other.nearest("t", unit(1, 0, 0, 0), 5, None)
        other.close()
        assert "built with model model-a" in caught.value.detail
        assert "re-index (`ragapi reindex`) or use a new data_dir" in caught.value.detail
        assert str(tmp_path) not in caught.value.detail
    store = VectorStore(settings, "model-a", DIM)
    assert len(store.nearest("t", unit(1, 0, 0, 0), 5, None)) == 1
    store.close()


@pytest.mark.parametrize(
    "url", ["localhost:8000", "ftp://host:8000", "http://:8000", "http://host:99999", "http://h/x"]
)
def test_malformed_chroma_urls_are_configuration_errors(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigurationError):
        VectorStore(make_settings(tmp_path, chroma_url=url), "model-a", DIM)


def test_an_unreachable_chroma_server_is_unavailable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, chroma_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServiceUnavailable):
        VectorStore(settings, "model-a", DIM)


def test_a_chroma_server_by_url(tmp_path: Path) -> None:
    # A server of its own: the model check is per server, and this test's model is a toy.
    with chroma_server(tmp_path) as url:
        settings = make_settings(tmp_path / "data", chroma_url=url)
        store = VectorStore(settings, "model-a", DIM)
        try:
            store.heartbeat()
            store.add("t", chunks_of("a", 3), [unit(1, 0, 0, 0)] * 3, {"a": {"team": "red"}})
            assert found_documents(store, "t", SearchFilters(metadata={"team": "red"})) == {"a"}
            store.delete_documents("t", ["a"])
            assert stored(store, "t", "a", 3) == 0
        finally:
            store.close()
        other = VectorStore(settings, "model-b", DIM)
        try:
            with pytest.raises(ConfigurationError):
                other.nearest("t", unit(1, 0, 0, 0), 5, None)
        finally:
            other.close()


# -- the originals store -------------------------------------------------------------------------


def test_originals_are_content_addressed_and_written_atomically(tmp_path: Path) -> None:
    with folder_store(tmp_path) as originals:
        with originals.upload() as upload:
            key = upload.put(b"hello")
            assert upload.put(b"hello") == key
        assert key == hashlib.sha256(b"hello").hexdigest()
        assert originals.exists(key) and originals.get(key) == b"hello"
        files = [p for p in (tmp_path / "originals").rglob("*") if p.is_file()]
        assert [p.name for p in files] == [key]  # one copy, no temporary file or pin left over
        originals.discard([key])
        originals.discard([key])
        assert not originals.exists(key)
        with pytest.raises(KeyError):
            originals.get(key)


def test_originals_an_upload_is_registering_are_not_discarded(tmp_path: Path) -> None:
    with folder_store(tmp_path) as originals:
        with originals.upload() as upload:
            key = upload.put(b"about to be registered")
            originals.discard([key])
            assert originals.get(key) == b"about to be registered"
        originals.discard([key])  # the upload ended without registering a document
        assert not originals.exists(key)


@pytest.mark.parametrize("key", ["../../etc/passwd", "ABC", "", "a" * 63, "g" * 64])
def test_originals_refuse_keys_that_are_not_sha256(tmp_path: Path, key: str) -> None:
    with folder_store(tmp_path) as originals:
        with pytest.raises(KeyError):
            originals.get(key)
        with pytest.raises(KeyError):
            originals.discard([key])


def test_an_upload_while_a_removal_has_moved_the_bytes_aside_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"uploaded again while its last document's deletion removes it"
    with folder_store(tmp_path) as originals, contextlib.ExitStack() as uploads:
        with originals.upload() as upload:
            key = upload.put(data)
        ask_registry = originals._referenced
        looks: list[Collection[str]] = []

        def upload_meanwhile(keys: Collection[str], excluding: str | None) -> set[str]:
            looks.append(list(keys))
            if len(looks) == 2:  # the removal's second look: the file is a tombstone now
                uploads.enter_context(originals.upload()).put(data)
            return ask_registry(keys, excluding)

        monkeypatch.setattr(originals, "_referenced", upload_meanwhile)
        originals.discard([key])
        assert looks == [[key], [key]]
        assert originals.get(key) == data
        uploads.close()  # the upload registered its document and ended
        monkeypatch.undo()
        assert originals.get(key) == data
        names = [p.name for p in (tmp_path / "originals").rglob("*") if p.is_file()]
        assert names == [key]


def test_a_search_finds_the_space_another_process_switched_the_tenant_to(tmp_path: Path) -> None:
    """Each process remembers a tenant's space for its searches instead of reading the
    registry each time; a move run by another process is seen as soon as that move drops the
    old collection."""
    settings = make_settings(tmp_path / "data")
    registry = Registry(f"sqlite:///{tmp_path / 'registry.db'}", upgrade=True)
    registry.record_default_model("model-a", DIM)
    searching = VectorStore(settings, "model-a", DIM, registry)
    moving = VectorStore(settings, "model-b", 8, registry)
    try:
        add_document(searching, "t", "doc", unit(1, 0, 0, 0))
        old = searching.search_space("t")
        assert old.model_id == "model-a"
        assert len(searching.nearest("t", unit(1, 0, 0, 0), 5, None, space=old)) == 1
        # The other process's move: the new model's vectors, the switch, the old ones dropped.
        moving.add("t", chunks_of("doc", 1), [unit(0, 1, 0, 0, 0, 0, 0, 0)], {"doc": {}})
        new = moving.spaces("t")[1]
        registry.switch_space("t", new)
        moving.drop_other_spaces("t", new)
        assert searching.search_space("t") == old  # remembered, not read again
        assert searching.nearest("t", unit(1, 0, 0, 0), 5, None, space=old) == []
        assert searching.search_space("t") == new
        found = searching.nearest("t", unit(0, 1, 0, 0, 0, 0, 0, 0), 5, None, space=new)
        assert [hit.document_id for hit in found] == ["doc"]
    finally:
        moving.close()
        searching.close()
        registry.close()
