"""Structured logs: one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else was passed through `extra=` and is logged.
STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Every request writes a line, so this is on the hot path: one encoder for all lines
    (json.dumps with `default` builds a new one per call) and the timestamp's date and time
    formatted once a second."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = json.JSONEncoder(default=str)
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,  # which worker, when there are several
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in STANDARD_ATTRS})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(line)

    def _timestamp(self, created: float) -> str:
        """RFC 3339 in UTC with microseconds, as datetime.isoformat writes it."""
        second = int(created)
        if second != self._second:  # handlers call format under their lock
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((created - second) * 1_000_000):06d}+00:00"


# The loggers whose lines are ragapi's: "ragapi.*" names the web layer's (access, errors), and
# every module under impl logs as its own name (impl.rag.jobs, impl.security.limits, ...).
LOGGER_TREES = ("ragapi", "impl")


def configure_logging(level: str) -> None:
    """Every line of ragapi's loggers, at ``level`` and above, as JSON on stderr. The trees are
    configured rather than the root logger, so libraries' own chatter keeps its defaults."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in LOGGER_TREES:
        tree = logging.getLogger(name)
        tree.handlers[:] = [handler]
        tree.setLevel(level.upper())
        tree.propagate = False
