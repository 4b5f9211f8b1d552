"""Structured logs: one JSON object per line on stderr, each with an `event` name.

Callers pass only safe fields; by convention nothing here ever receives a seed, a
signature or a JWT (the test suite scans the logs for them).

Cheap enough for a line per decision: once `setup` has installed our handler and nothing else
listens, a line is rendered straight from its fields (no `logging.LogRecord`, no caller
lookup), and inside an event loop info and debug lines wait for the loop's next turn (or
until `FLUSH_BYTES` are waiting) and are written together: one write for a burst of
decisions instead of one each. Warnings and errors are written at once, after whatever was
waiting, so the order of lines is kept. Lines still waiting when the process exits are
written by `logging.shutdown` (at exit); a SIGKILL loses at most one loop turn's worth.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

_LOGGER = logging.getLogger("callout")
_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}

# (created, level, event, fields) -> the line, without its newline.
Render = Callable[[float, int, str, dict[str, Any]], str]
FLUSH_BYTES = 64 * 1024


def _render_json(created: float, level: int, event: str, fields: dict[str, Any]) -> str:
    doc: dict[str, Any] = {
        "ts": round(created, 3),
        "level": _LEVELS.get(level) or logging.getLevelName(level).lower(),
        "event": event,
    }
    doc.update(fields)
    try:
        return orjson.dumps(doc, default=str).decode()
    except orjson.JSONEncodeError:
        # What orjson does not write (an integer past 64 bits, from a client's request): the
        # standard library writes everything.
        return json.dumps(doc, default=str, ensure_ascii=False, separators=(",", ":"))


def _render_console(created: float, level: int, event: str, fields: dict[str, Any]) -> str:
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    stamp = time.strftime("%H:%M:%S", time.localtime(created))
    name = _LEVELS.get(level) or logging.getLevelName(level).lower()
    return f"{stamp} {name:7} {event:18} {text}".rstrip()


class _Formatter(logging.Formatter):
    """Renders records that come through `logging` (other libraries' among them)."""

    def __init__(self, render: Render) -> None:
        super().__init__()
        self.render = render

    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        if record.exc_info and record.exc_info[0] is not None:
            fields = {**fields, "exception": record.exc_info[0].__name__}
        return self.render(record.created, record.levelno, _event(record), fields)


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
    return {"logger": record.name, "message": first_line}


class _Handler(logging.StreamHandler[TextIO]):
    """Writes lines to its stream; inside an event loop, lines below WARNING wait for the loop's
    next turn and are written together (see the module docstring)."""

    def __init__(self, stream: TextIO, render: Render) -> None:
        super().__init__(stream)
        self.setFormatter(_Formatter(render))
        self.render = render
        self._waiting: list[str] = []
        self._size = 0
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write(record.levelno, self.format(record))
        except Exception:
            self.handleError(record)

    def write(self, level: int, line: str) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._waiting.append(line)
            self._size += len(line)
            if level >= logging.WARNING or self._size >= FLUSH_BYTES:
                self.flush()
                return
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread: nothing would write it later
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled = False
            if self._waiting:
                text = "\n".join(self._waiting) + "\n"
                self._waiting.clear()
                self._size = 0
                self.stream.write(text)
            super().flush()


_HANDLER: _Handler | None = None


def setup(level: str = "info", fmt: str = "json") -> None:
    global _HANDLER
    if _HANDLER is not None:
        _HANDLER.flush()
    handler = _Handler(sys.stderr, _render_console if fmt == "console" else _render_json)
    _HANDLER = handler
    _LOGGER.handlers[:] = [handler]
    _LOGGER.setLevel(level.upper())
    _LOGGER.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def _log(level: int, event: str, fields: dict[str, Any]) -> None:
    if not _LOGGER.isEnabledFor(level):
        return
    handler, handlers = _HANDLER, _LOGGER.handlers
    if handler is not None and len(handlers) == 1 and handlers[0] is handler:
        handler.write(level, handler.render(time.time(), level, event, fields))
    else:  # someone else listens too (a test's capture): through `logging`
        _LOGGER.log(level, event, extra={"fields": fields})


def debug(event: str, **fields: Any) -> None:
    _log(logging.DEBUG, event, fields)


def info(event: str, **fields: Any) -> None:
    _log(logging.INFO, event, fields)


def info_fields(event: str, fields: dict[str, Any]) -> None:
    """`info(event, **fields)` for a dict already built (the decision line): no copy."""
    _log(logging.INFO, event, fields)


def warning(event: str, **fields: Any) -> None:
    _log(logging.WARNING, event, fields)


def error(event: str, **fields: Any) -> None:
    _log(logging.ERROR, event, fields)
