"""callout.log: lines written together once per event-loop turn, in order, and the same
whichever way they are rendered (straight from the fields, or through `logging` when a
capture listens)."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from callout import log


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """`log.setup` as the CLI does, writing into a StringIO; the old handlers put back after."""
    loggers = [logging.getLogger(), logging.getLogger("callout")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    out = io.StringIO()
    log.setup("info", "json")
    handler = logging.getLogger("callout").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    yield out
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def events(out: io.StringIO) -> list[str]:
    return [orjson.loads(line)["event"] for line in out.getvalue().splitlines()]


async def flushed() -> None:
    """The loop's next turn."""
    await asyncio.sleep(0)


async def test_info_lines_are_written_together(stream: io.StringIO) -> None:
    for i in range(3):
        log.info("decision", n=i)
    assert stream.getvalue() == ""  # not one write per line
    await flushed()
    assert events(stream) == ["decision"] * 3


async def test_a_big_burst_is_written_without_waiting(stream: io.StringIO) -> None:
    lines = 0
    while stream.getvalue() == "":
        log.info("decision", pad="x" * 100)
        lines += 1
        assert lines < 10_000
    # Written, all of it, once FLUSH_BYTES were waiting.
    assert len(events(stream)) == lines
    text = stream.getvalue()
    size = len(text) - lines  # without the newlines
    assert size >= log.FLUSH_BYTES > size - len(text.splitlines()[-1])


async def test_a_warning_is_written_at_once_after_what_waited(stream: io.StringIO) -> None:
    log.info("first")
    log.warning("second", detail="x")
    assert events(stream) == ["first", "second"]
    log.info("third")
    await flushed()
    assert events(stream) == ["first", "second", "third"]


def test_without_a_loop_lines_are_written_at_once(stream: io.StringIO) -> None:
    log.info("alone", n=1)
    assert events(stream) == ["alone"]


async def test_lines_are_the_same_with_and_without_a_capture(stream: io.StringIO) -> None:
    fields = {"client": "UABC", "latency_ms": 0.25, "cid": 7, "detail": "é ü"}
    log.info("decision", **fields)
    await flushed()
    direct = orjson.loads(stream.getvalue())
    logger = logging.getLogger("callout")
    capture = logging.NullHandler()  # another listener: lines go through `logging`
    logger.addHandler(capture)
    try:
        log.info("decision", **fields)
        await flushed()
    finally:
        logger.removeHandler(capture)
    through_logging = orjson.loads(stream.getvalue().splitlines()[1])
    assert direct.pop("ts") > 0 and through_logging.pop("ts") > 0
    assert direct == through_logging == {"level": "info", "event": "decision", **fields}
