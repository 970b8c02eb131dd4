"""Uploads are parsed in processes of their own, one per document.

Each document is recognised and read (loaders.detect_media_type, loaders.extract_text) in a
child process forked from a forkserver that has the parsers imported, so a child starts in
milliseconds. The child may use max_parse_memory_bytes of address space and a little more CPU
time than max_parse_seconds; the caller waits max_parse_seconds for its answer and kills it when
none came. So a parse ends within its time limit even inside one long library call, its memory
is the operating system's to take back the moment it ends, and a parser library that crashes
fails one document instead of the server. At most parse_workers documents are parsed at once,
however many requests the HTTP server's threads carry.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import resource
import threading
import time
from multiprocessing import forkserver
from multiprocessing.connection import Connection

from impl.errors import DocumentTooLarge, RagapiError, ServiceUnavailable, UnreadableDocument
from impl.rag.loaders import (
    PARSER_MODULES,
    ExtractedText,
    ParseLimits,
    detect_media_type,
    extract_text,
)
from impl.settings import Settings

logger = logging.getLogger(__name__)

MB = 1024 * 1024
# Parsing yields the CPU to the server's own threads, so that the API keeps answering while
# parsers run flat out.
_CHILD_NICENESS = 10

# (media type, text), or the error that refused the document.
_Outcome = tuple[str, ExtractedText] | RagapiError


class ParserProcesses:
    def __init__(self, settings: Settings) -> None:
        self.limits = ParseLimits.from_settings(settings)
        self.memory_bytes = settings.max_parse_memory_bytes
        self.wait_seconds = settings.parse_wait_seconds
        self._slots = threading.BoundedSemaphore(settings.parse_workers)
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload([__name__, *PARSER_MODULES])

    def start(self) -> None:
        """Start the forkserver now, in the background, rather than at the first upload: it
        imports every parser library first, which cost the first upload after a start about a
        second (scripts/bench --scaling), counted against that parse's time limit."""
        forkserver.ensure_running()

    def parse(
        self, content: bytes, filename: str | None, declared: str | None
    ) -> tuple[str, ExtractedText]:
        """The media type and text of an upload, as loaders' functions give them, within
        the limits. Raises what they raise, DocumentTooLarge past a limit, and
        ServiceUnavailable when no parser came free within parse_wait_seconds."""
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise ServiceUnavailable("every document parser is busy; try again shortly")
        try:
            outcome = self._run_child(content, filename, declared)
        finally:
            self._slots.release()
        if isinstance(outcome, RagapiError):
            raise outcome
        return outcome

    def _run_child(self, content: bytes, filename: str | None, declared: str | None) -> _Outcome:
        deadline = time.monotonic() + self.limits.max_parse_seconds
        connection, child_end = self._context.Pipe()
        child = self._context.Process(
            target=_parse_in_child,
            args=(child_end, filename, declared, self.limits, self.memory_bytes),
            name="ragapi-parser",
            daemon=True,
        )
        try:
            child.start()
        finally:
            child_end.close()  # the child holds the only other end: its death reads as EOF
        try:
            # Through the pipe, not the arguments: the forkserver would pickle a copy first.
            connection.send_bytes(content)
            if not connection.poll(max(0.0, deadline - time.monotonic())):
                return DocumentTooLarge(
                    f"reading the document took longer than {self.limits.max_parse_seconds:g} "
                    "seconds"
                )
            outcome: _Outcome = connection.recv()
            return outcome
        except (EOFError, BrokenPipeError):
            child.join()
            logger.warning("a parser died without an answer (exit code %s)", child.exitcode)
            return UnreadableDocument("the document could not be read (its parser failed)")
        finally:
            connection.close()
            if child.is_alive():
                child.kill()
            child.join()
            child.close()


def _parse_in_child(
    connection: Connection,
    filename: str | None,
    declared: str | None,
    limits: ParseLimits,
    memory_bytes: int,
) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # A backstop only: the parent kills the child at max_parse_seconds of wall time.
    cpu_seconds = math.ceil(limits.max_parse_seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    os.nice(_CHILD_NICENESS)
    content = connection.recv_bytes()
    outcome: _Outcome
    try:
        media_type = detect_media_type(content, filename, declared)
        outcome = (media_type, extract_text(content, media_type, limits))
    except RagapiError as exc:
        outcome = exc
    except MemoryError:
        outcome = DocumentTooLarge(
            f"reading the document needs more than {memory_bytes // MB:,} MB of memory"
        )
    connection.send(outcome)
    connection.close()
