"""What the live-revocation tests share: a server with a system-account nkey user (the
identity the service kicks with), and a wait for the server to close a connection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.nats import Keys, NatsServer, free_port, new_user, render_config
from tests.support.service import seed_files, write_seed


def system_config(keys: Keys, workdir: Path, system_pub: str) -> NatsServer:
    """The harness's config with an nkey user in SYS that bypasses the callout."""
    port = free_port()
    config = render_config(port=port, keys=keys, store_dir=workdir / "js", sys_nkey=system_pub)
    return NatsServer(config, port=port, workdir=workdir, store_dir=workdir / "js")


@pytest.fixture
def revocation_setup(tmp_path: Path, keys: Keys) -> Any:
    system_seed, system_pub = new_user()
    server = system_config(keys, tmp_path / "server", system_pub).start()
    files = seed_files(keys, tmp_path / "keys")
    files["system"] = write_seed(tmp_path / "keys" / "system.nk", system_seed)
    yield server, files
    server.stop()
