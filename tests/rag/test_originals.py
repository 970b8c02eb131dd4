"""Where originals live: the registry's database (written with the document row, removed with
its last user's row), a folder named by URL, and the sweep of files no document references."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from impl.errors import ConfigurationError, NotFound, PreconditionFailed
from impl.rag.embeddings import EmbeddingModel
from impl.rag.originals import LocalOriginalStore, content_key, open_originals
from impl.rag.registry import Registry
from impl.rag.service import RagService
from impl.rag.types import Job
from tests.documents import CORPUS
from tests.rag.conftest import ServiceFactory, ingest, make_settings, text_item
from tests.test_cli import ragapi

TENANT = "acme"
OTHER = "globex"


def stored_keys(registry_url: str) -> set[str]:
    engine = create_engine(registry_url)
    try:
        with engine.connect() as connection:
            return set(connection.execute(text("SELECT key FROM originals")).scalars())
    finally:
        engine.dispose()


def test_the_registry_holds_the_originals_and_frees_them_with_their_last_document(
    make_service: ServiceFactory, registry_url: str, data_dir: Path
) -> None:
    service = make_service(
        registry_url=registry_url, registry_auto_upgrade=True, originals_url="registry://"
    )
    saturn, bread = CORPUS["saturn"], CORPUS["sourdough"]
    saturn_text = "\n\n".join(saturn.paragraphs)
    job = ingest(
        service,
        TENANT,
        [text_item(saturn_text, title=saturn.title), text_item("\n\n".join(bread.paragraphs))],
    )
    saturn_id, bread_id = job.document_ids
    # The other tenant holds the same bytes: one stored row serves both.
    ingest(service, OTHER, [text_item(saturn_text)])

    assert not (data_dir / "originals").exists() or not any((data_dir / "originals").rglob("*"))
    held = stored_keys(registry_url)
    assert content_key(saturn_text.encode()) in held
    assert len(held) == 4  # two originals, two extracted texts
    assert service.search(TENANT, saturn.question, top_k=1)[0].chunk.document_id == saturn_id

    service.delete_document(TENANT, saturn_id)
    assert stored_keys(registry_url) == held  # the other tenant's document still uses them
    service.delete_document(TENANT, bread_id)
    assert content_key(saturn_text.encode()) in stored_keys(registry_url)
    assert len(stored_keys(registry_url)) == 2


def test_a_replacement_stores_its_bytes_in_the_registry_with_its_registration(
    make_service: ServiceFactory, registry_url: str
) -> None:
    service = make_service(
        registry_url=registry_url, registry_auto_upgrade=True, originals_url="registry://"
    )
    (document_id,) = ingest(service, TENANT, [text_item("The lamp is lit at dusk.")]).document_ids
    first = stored_keys(registry_url)

    refused = "The lamp is lit at dawn."
    with pytest.raises(PreconditionFailed):
        service.replace_document(
            TENANT, document_id, text_item(refused), metadata=None, if_match=['"stale"']
        )
    assert stored_keys(registry_url) == first  # a refused replacement stores nothing

    replacement = "The lamp is lit an hour before sunset."
    job = service.replace_document(
        TENANT, document_id, text_item(replacement), metadata=None, if_match=None
    )
    assert service.wait_for_job(TENANT, job.id, 120).status == "succeeded"
    assert content_key(replacement.encode()) in stored_keys(registry_url)
    hit = service.search(TENANT, "when is the lamp lit before sunset", top_k=1)[0]
    assert (hit.chunk.document_id, hit.chunk.version) == (document_id, 2)
    assert "hour before sunset" in hit.chunk.text


def test_a_folder_by_url_holds_the_originals(make_service: ServiceFactory, tmp_path: Path) -> None:
    shared = tmp_path / "shared-volume"
    service = make_service(originals_url=f"file://{shared}")
    content = "\n\n".join(CORPUS["saturn"].paragraphs).encode()
    ingest(service, TENANT, [text_item(content.decode())])
    key = content_key(content)
    assert (shared / key[:2] / key[2:4] / key).read_bytes() == content


@pytest.mark.parametrize("url", ["s3://bucket/originals", "file://relative/folder", "registry"])
def test_an_unknown_originals_url_is_refused_naming_the_choices(tmp_path: Path, url: str) -> None:
    settings = make_settings(tmp_path, originals_url=url)
    with pytest.raises(ConfigurationError, match="file:///absolute/folder or registry://"):
        open_originals(settings, database=None)  # type: ignore[arg-type]


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_sweep_removes_what_crashes_left_and_nothing_in_use(
    make_service: ServiceFactory, data_dir: Path
) -> None:
    service = make_service()
    content = "Kept: a document references these bytes."
    ingest(service, TENANT, [text_item(content)])
    service.close()
    root = data_dir / "originals"
    registry = Registry(make_settings(data_dir).resolved_registry_url, upgrade=True)
    try:
        folder = LocalOriginalStore(root, registry.database)
        with folder.upload() as upload:
            orphan = upload.put(b"stored by an upload whose process died before registering")
            in_flight = upload.put(b"stored a moment ago, its document about to be registered")
            doomed = upload.put(b"being removed by a process that died")
        stored = {path.name: path for path in root.rglob("*") if path.is_file()}
        # Its upload never ended: the pin it made two hours ago is still there.
        died = stored[orphan].with_name(f"{orphan}.pin-{int(time.time()) - 7200}-died")
        os.link(stored[orphan], died)
        leftover = root / "ab" / "cd" / ".tmp-crashed"
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"half a file")
        for path in root.rglob("*"):
            if path.is_file() and path.name != in_flight:
                age(path, 7200)
        # Removals that died after moving the bytes aside, before deciding: one of bytes a
        # document uses, which readers still find meanwhile.
        kept = content_key(content.encode())
        stored[kept].rename(stored[kept].with_name(f"{kept}.tomb-died"))
        assert folder.get(kept) == content.encode()
        stored[doomed].rename(stored[doomed].with_name(f"{doomed}.tomb-died"))
    finally:
        registry.close()

    swept = ragapi(data_dir, "originals", "sweep")

    assert swept.returncode == 0, swept.stderr
    assert swept.stdout.strip() == "3 unreferenced file(s) removed"
    remaining = {path.name for path in root.rglob("*") if path.is_file()}
    assert remaining == stored.keys() - {orphan, doomed}  # the tombstone in use restored


def test_a_deletion_on_one_machine_never_removes_bytes_an_upload_on_another_is_registering(
    make_service: ServiceFactory,
    embeddings: EmbeddingModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two machines share only the registry and the originals folder. Machine B uploads bytes
    that machine A's document holds, and A deletes that document in the worst moment: after
    B stored its bytes (already there, so nothing was written) and before B's registration
    commits. B's document must still find its stored copy when a worker chunks it."""
    shared = {
        "registry_url": f"sqlite:///{tmp_path / 'registry.db'}",
        "registry_auto_upgrade": True,
        "originals_url": f"file://{tmp_path / 'shared-originals'}",
    }
    machine_a = make_service(**shared)
    machine_b = RagService(make_settings(tmp_path / "machine-b", **shared), embeddings)
    try:
        machine_b.start()
        content = "\n\n".join(CORPUS["saturn"].paragraphs)
        (held,) = ingest(machine_a, TENANT, [text_item(content)]).document_ids

        registry_b = machine_b._documents
        register = registry_b.register_ingest

        def deleted_meanwhile(*args: Any, **kwargs: Any) -> Job:
            machine_a.delete_document(TENANT, held)
            return register(*args, **kwargs)

        monkeypatch.setattr(registry_b, "register_ingest", deleted_meanwhile)
        job = machine_b.submit_ingest(OTHER, [text_item(content)])
        monkeypatch.undo()

        finished = machine_b.wait_for_job(OTHER, job.id, 120)
        (document_id,) = finished.document_ids
        document = machine_b.get_document(OTHER, document_id)
        assert (finished.status, document.status, document.error) == ("succeeded", "ready", None)
        hits = machine_b.search(OTHER, CORPUS["saturn"].question, top_k=1)
        assert hits[0].chunk.document_id == document_id
        with pytest.raises(NotFound):
            machine_a.get_document(TENANT, held)
    finally:
        machine_b.close()
