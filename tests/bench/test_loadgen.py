"""bench.loadgen against a real no-callout nats-server: it admits and denies what the server
does, and records one latency per connect. No timing is asserted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bench.loadgen import ADMITTED, DENIED, identities, limit_config, run
from tests.support.nats import NatsServer, free_port, new_user


@asynccontextmanager
async def limit_server(workdir: Path, allowed: list[str]) -> AsyncIterator[NatsServer]:
    """A server with `allowed` as static nkey users and no callout (the LIMIT scenario)."""
    port = free_port()
    server = await NatsServer(limit_config(port, allowed), port=port, workdir=workdir).astart()
    try:
        yield server
    finally:
        await server.astop()


async def test_every_configured_user_is_admitted_and_timed(tmp_path: Path) -> None:
    users = [new_user() for _ in range(5)]
    async with limit_server(tmp_path, [p for _, p in users]) as server:
        result = await run(server.url, identities([s for s, _ in users]), 50, 5, 10.0)
    assert result.admitted == 50, result.summary()
    assert len(result.latencies) == 50
    assert all(latency > 0 for latency in result.latencies)


async def test_an_unknown_user_is_counted_as_denied(tmp_path: Path) -> None:
    known, unknown = new_user(), new_user()
    async with limit_server(tmp_path, [known[1]]) as server:
        # Users cycle by connect number: even connects are `known`, odd ones `unknown`.
        result = await run(server.url, identities([known[0], unknown[0]]), 10, 2, 10.0)
    assert list(result.outcomes) == [ADMITTED, DENIED] * 5
    assert result.errors == {"Authorization Violation": 5}
