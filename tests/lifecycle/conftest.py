"""What the live-revocation tests share: a server with a system-account nkey user (the
identity the service kicks with), and a wait for the server to close a connection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Keys, NatsServer, free_port, new_user, render_config
from tests.service import seed_files, write_seed


def system_config(keys: Keys, workdir: Path, system_pub: str) -> NatsServer:
    """The harness's config with an nkey user in SYS that bypasses the callout."""
    port = free_port()
    config = render_config(port=port, keys=keys, store_dir=workdir / "js", sys_nkey=system_pub)
    return NatsServer(config, port=port, workdir=workdir, store_dir=workdir / "js")


async def closed(conn: Any, timeout: float = 5.0) -> list[bytes]:
    """Wait for the server to close this raw connection (EOF); returns what it said last."""
    said: list[bytes] = []
    async with asyncio.timeout(timeout):
        while line := await conn.reader.readline():
            if line == b"PING\r\n":
                conn.writer.write(b"PONG\r\n")
            said.append(line)
    return said


@pytest.fixture
def revocation_setup(tmp_path: Path, keys: Keys) -> Any:
    system_seed, system_pub = new_user()
    server = system_config(keys, tmp_path / "server", system_pub).start()
    files = seed_files(keys, tmp_path / "keys")
    files["system"] = write_seed(tmp_path / "keys" / "system.nk", system_seed)
    yield server, files
    server.stop()
