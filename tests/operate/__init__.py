"""Helpers for the operations tests: an in-process service with `callout.observability` around it,
a bare HTTP client for the health port, and a reader for the Prometheus text format."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from callout import observability
from callout.observability import Observability
from callout.settings import ObservabilitySettings
from callout.store import Store
from tests.harness import Keys, NatsServer
from tests.service import InProcess, start_in_process


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


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an outside observable (an HTTP endpoint, a stream) until it holds. The service
    has no event to await for these: the state is only visible by asking."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


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
def captured_logs() -> Iterator[LogCapture]:
    logger = logging.getLogger("callout")
    handler = LogCapture()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
