"""Readiness's deadline: a component that hangs is down after PROBE_TIMEOUT_SECONDS, without
holding up the others or piling up threads; the originals folder's probe on a real folder."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import pytest

from impl.api.readiness import PROBE_TIMEOUT_SECONDS, Readiness
from impl.errors import DependencyUnavailable
from tests.rag.conftest import folder_store


def test_a_probe_that_hangs_is_down_at_the_deadline_and_runs_once() -> None:
    release = threading.Event()
    started: list[float] = []

    def hangs() -> None:
        started.append(time.monotonic())
        release.wait(30)

    readiness = Readiness({"hangs": hangs, "works": lambda: None})

    async def ask_twice() -> tuple[dict[str, bool], dict[str, bool], float]:
        began = time.monotonic()
        first = await readiness.check()
        second = await readiness.check()
        took = time.monotonic() - began
        release.set()  # asyncio.run waits for its threads before it returns
        return first, second, took

    first, second, took = asyncio.run(ask_twice())
    assert first == second == {"hangs": False, "works": True}
    assert took < 2 * PROBE_TIMEOUT_SECONDS + 1.5
    assert len(started) == 1  # the second check waited on the same, still running, probe


def test_the_originals_probe_fails_while_the_folder_is_gone(tmp_path: Path) -> None:
    root = tmp_path / "originals"
    with folder_store(tmp_path) as store:
        with store.upload() as upload:
            key = upload.put(b"kept")
        store.check()
        moved = tmp_path / "elsewhere"
        root.rename(moved)
        root.write_bytes(b"")  # a file where the folder was: every write into it fails
        with pytest.raises(DependencyUnavailable, match="originals store"):
            store.check()
        with pytest.raises(DependencyUnavailable), store.upload() as upload:
            upload.put(b"new")
        root.unlink()
        shutil.move(moved, root)
        store.check()
        assert store.get(key) == b"kept"
