"""Uploads are parsed in processes of their own, one per request.

A request's documents are recognised and read (loaders.detect_media_type, loaders.extract_text)
one after another in a child process forked from a forkserver that has the parsers imported.
Forking and ending a child costs about 10 ms of CPU, twice what reading a small HTML page does
(docs/benchmarks.md, "Worker scaling"), so the documents of one request share it. Each document
may take max_parse_seconds: the caller waits that long for each answer and kills the child when
none came. The child may use max_parse_memory_bytes of address space; a document that runs out
of it after others were read in the same child is read again in a fresh one, so that every
document gets the whole limit. So a parse ends within its time limit even inside one long
library call, its memory is the operating system's to take back the moment the request's
parsing ends, and a parser library that crashes fails one request instead of the server. At most
parse_workers documents are parsed at once, however many requests the HTTP server's threads
carry.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import resource
import threading
from collections.abc import Sequence
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
from impl.rag.types import IngestItem
from impl.settings import Settings

logger = logging.getLogger(__name__)

MB = 1024 * 1024
# Parsing yields the CPU to the server's own threads, so that the API keeps answering while
# parsers run flat out.
_CHILD_NICENESS = 10

# (media type, text), or the error that refused the document.
_Outcome = tuple[str, ExtractedText] | RagapiError
# How long a child that was told there are no more documents may take to end.
_END_SECONDS = 5.0
# The child's answer for a document that ran out of memory after it had read others: read it
# again in a fresh child.
_READ_AGAIN = None


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

    def parse(self, items: Sequence[IngestItem]) -> list[_Outcome]:
        """The media type and text of each item in turn, as loaders' functions give them,
        within the limits, up to the first item refused: its error (what they raise, or
        DocumentTooLarge past a limit) is the last outcome. Raises ServiceUnavailable when no
        parser came free within parse_wait_seconds."""
        if not self._slots.acquire(timeout=self.wait_seconds):
            raise ServiceUnavailable("every document parser is busy; try again shortly")
        try:
            outcomes: list[_Outcome] = []
            while len(outcomes) < len(items) and not (
                outcomes and isinstance(outcomes[-1], RagapiError)
            ):
                outcomes += self._run_child(items[len(outcomes) :])
        finally:
            self._slots.release()
        return outcomes

    def _run_child(self, items: Sequence[IngestItem]) -> list[_Outcome]:
        """The outcomes of one child's reading of ``items``, up to the first refused or the
        first to be read again in a fresh child (which is left out)."""
        connection, child_end = self._context.Pipe()
        child = self._context.Process(
            target=_parse_in_child,
            args=(child_end, self.limits, self.memory_bytes),
            name="ragapi-parser",
            daemon=True,
        )
        try:
            child.start()
        finally:
            child_end.close()  # the child holds the only other end: its death reads as EOF
        outcomes: list[_Outcome] = []
        try:
            for item in items:
                # Through the pipe, not the arguments: the forkserver would pickle a copy first.
                connection.send((item.filename, item.declared_media_type))
                connection.send_bytes(item.content)
                if not connection.poll(self.limits.max_parse_seconds):
                    child.kill()
                    outcomes.append(
                        DocumentTooLarge(
                            "reading the document took longer than "
                            f"{self.limits.max_parse_seconds:g} seconds"
                        )
                    )
                    break
                outcome: _Outcome | None = connection.recv()
                if outcome is _READ_AGAIN:
                    break
                outcomes.append(outcome)
                if isinstance(outcome, RagapiError):
                    break
        except (EOFError, ConnectionError):  # a pipe broken or reset by its death
            child.join()
            logger.warning("a parser died without an answer (exit code %s)", child.exitcode)
            outcomes.append(
                UnreadableDocument("the document could not be read (its parser failed)")
            )
        finally:
            connection.close()  # the child reads no more documents and ends
            child.join(timeout=_END_SECONDS)
            if child.is_alive():
                child.kill()
                child.join()
            child.close()
        return outcomes


def _parse_in_child(connection: Connection, limits: ParseLimits, memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    os.nice(_CHILD_NICENESS)
    # A backstop only: the parent kills the child at max_parse_seconds of wall time.
    cpu_seconds = math.ceil(limits.max_parse_seconds) + 1
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    documents_read = 0
    while True:
        try:
            filename, declared = connection.recv()
            content = connection.recv_bytes()
        except EOFError:  # no more documents
            break
        used = resource.getrusage(resource.RUSAGE_SELF)
        cpu_soft = math.ceil(used.ru_utime + used.ru_stime) + cpu_seconds
        if cpu_hard != resource.RLIM_INFINITY:
            cpu_soft = min(cpu_soft, cpu_hard)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_hard))
        outcome: _Outcome | None
        try:
            media_type = detect_media_type(content, filename, declared)
            outcome = (media_type, extract_text(content, media_type, limits))
        except RagapiError as exc:
            outcome = exc
        except MemoryError:
            outcome = (
                _READ_AGAIN
                if documents_read
                else DocumentTooLarge(
                    f"reading the document needs more than {memory_bytes // MB:,} MB of memory"
                )
            )
        del content  # not held while the next document is received
        connection.send(outcome)
        if not isinstance(outcome, tuple):
            break
        documents_read += 1
    connection.close()
