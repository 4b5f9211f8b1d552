"""Structured logs: one JSON object per line on stderr, each with an `event` name.

Callers pass only safe fields; by convention nothing here ever receives a seed, a
signature or a JWT (the test suite scans the logs for them).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_LOGGER = logging.getLogger("callout")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": _event(record),
        }
        doc.update(_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            doc["exception"] = record.exc_info[0].__name__
        return orjson.dumps(doc, default=str).decode()


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {record.levelname.lower():7} {_event(record):18} {fields}".rstrip()


# Records from other libraries (asyncio, nats-py) reach the root logger: they get the event
# name "library" and the first line of their text as a field, so every line still has an
# event; a traceback is reduced to the exception's type (it could quote anything, secrets
# included).
def _event(record: logging.LogRecord) -> str:
    return record.getMessage() if hasattr(record, "fields") else "library"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    ours: dict[str, Any] | None = getattr(record, "fields", None)
    if ours is not None:
        return ours
    # First line only: asyncio puts the failed task's repr, exception text included, below it.
    first_line = record.getMessage().split("\n", 1)[0][:200]
    fields: dict[str, Any] = {"logger": record.name, "message": first_line}
    if record.exc_info and record.exc_info[0] is not None:
        fields["exception"] = record.exc_info[0].__name__
    return fields


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter() if fmt == "console" else _JsonFormatter())
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def _log(level: int, event: str, fields: dict[str, Any]) -> None:
    if _LOGGER.isEnabledFor(level):
        _LOGGER.log(level, event, extra={"fields": fields})


def debug(event: str, **fields: Any) -> None:
    _log(logging.DEBUG, event, fields)


def info(event: str, **fields: Any) -> None:
    _log(logging.INFO, event, fields)


def warning(event: str, **fields: Any) -> None:
    _log(logging.WARNING, event, fields)


def error(event: str, **fields: Any) -> None:
    _log(logging.ERROR, event, fields)
