"""Helpers for the operations tests: an in-process service with `callout.observability` around it,
a bare HTTP client for the health port, and a reader for the Prometheus text format."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from callout import observability
from callout.observability import Observability
from callout.settings import ObservabilitySettings
from callout.store import Store
from tests.support.nats import Keys, NatsServer
from tests.support.service import InProcess, start_in_process


@dataclass
class Http:
    status: int
    headers: dict[str, str]
    body: str


async def http_get(port: int, path: str, method: str = "GET") -> Http:
    """One HTTP/1.1 request the plain way (no client library: the server is ours to check)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if method != "HEAD":  # HEAD announces the length of the body it does not send
        assert int(headers["content-length"]) == len(body)
    return Http(status, headers, body.decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, keyed by (sample name, labels)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


async def scrape(port: int) -> str:
    response = await http_get(port, "/metrics")
    assert response.status == 200
    return response.body


def ops_args(**overrides: Any) -> ObservabilitySettings:
    base: dict[str, Any] = {
        "metrics_addr": ("127.0.0.1", 0),
        "audit_stream": None,
        "audit_max_age": 3600.0,
        "audit_max_bytes": 1 << 24,
    }
    base.update(overrides)
    return ObservabilitySettings(**base)


@dataclass
class Operated:
    svc: InProcess
    ops: Observability

    @property
    def port(self) -> int:
        port = self.ops.http_port
        assert port is not None
        return port


@contextlib.asynccontextmanager
async def operated(
    server: NatsServer,
    keys: Keys,
    *,
    store: Store | None = None,
    args: ObservabilitySettings | None = None,
    **policy: Any,
) -> AsyncIterator[Operated]:
    svc = await start_in_process(server, keys, store=store, **policy)
    try:
        ops = await observability.start(
            svc.nc, svc.service, svc.service.store, args or ops_args(), probe_timeout=1.0
        )
        try:
            yield Operated(svc, ops)
        finally:
            await svc.service.stop()
            await ops.stop()
    finally:
        await svc.stop()


class LogCapture(logging.Handler):
    """The service's log events (the `callout` logger does not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(
            (record.levelname.lower(), record.getMessage(), dict(getattr(record, "fields", {})))
        )

    def named(self, event: str) -> list[tuple[str, dict[str, Any]]]:
        return [(level, fields) for level, name, fields in self.events if name == event]


@contextlib.contextmanager
def captured_logs(handler: Any = None, *, root: bool = False) -> Iterator[Any]:
    """Attach `handler` (a `LogCapture` by default) to the `callout` logger at DEBUG, and to the
    root logger too when `root` is set (what other libraries log); detach it on exit."""
    capture = handler if handler is not None else LogCapture()
    loggers = [logging.getLogger("callout")] + [logging.getLogger()] * root
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(capture)
        logger.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.removeHandler(capture)
            logger.setLevel(level)


async def gather(nc: Client, subject: str, expect: int, timeout: float = 5.0) -> list[Any]:
    """Publish one request and collect `expect` answers (the micro protocol's scatter-gather)."""
    inbox = nc.new_inbox()
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Any) -> None:
        queue.put_nowait(msg.data)

    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        await nc.publish(subject, b"", reply=inbox)
        return [orjson.loads(await asyncio.wait_for(queue.get(), timeout)) for _ in range(expect)]
    finally:
        await sub.unsubscribe()
