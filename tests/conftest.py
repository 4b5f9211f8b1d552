"""Shared fixtures. Generic harness fixtures first; service fixtures go below."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.nats import Keys, NatsServer, ServerFactory, make_keys
from tests.support.service import seed_files

# ---------------------------------------------------------------------------
# harness fixtures (generic: no callout code involved)
# ---------------------------------------------------------------------------


@pytest.fixture
def keys() -> Keys:
    """Fresh issuer (SA/A), service user (SU/U) and xkey (SX/X) for this test."""
    return make_keys()


@pytest.fixture
def nats_server(tmp_path: Path, keys: Keys) -> Iterator[ServerFactory]:
    """Factory: ``nats_server(**render_config kwargs) -> started NatsServer``.

    Defaults to the test's ``keys``; each call gets its own ``tmp_path/serverN``
    directory (config, log, JetStream store) and a fresh port. Every server started
    here is stopped at teardown (SIGTERM, SIGKILL after 5 s), even if the test failed.
    Keyword arguments are those of ``tests.support.nats.render_config`` (except
    ``port``/``keys``/``store_dir``/``http_port``), e.g. ``auth_timeout=0.5``,
    ``xkey=True``, ``sys_user=("sys", "pw")``, ``jetstream=False``.
    """
    started: list[NatsServer] = []

    def factory(
        *, keys: Keys | None = None, http: bool = False, **render_kwargs: Any
    ) -> NatsServer:
        workdir = tmp_path / f"server{len(started)}"
        srv = NatsServer.from_keys(workdir, keys or _keys, http=http, **render_kwargs)
        started.append(srv)
        return srv.start()

    _keys = keys
    try:
        yield factory
    finally:
        for srv in reversed(started):
            srv.stop()


# ---------------------------------------------------------------------------
# service fixtures (callout package) go here
# ---------------------------------------------------------------------------


@pytest.fixture
def server(nats_server: ServerFactory) -> NatsServer:
    """A started nats-server with the default config (JetStream, the callout, this test's keys);
    tests that need another config call `nats_server(...)` themselves."""
    return nats_server()


@pytest.fixture
def files(keys: Keys, tmp_path: Path) -> dict[str, Path]:
    """This test's keys as the seed files `callout serve` reads (issuer, service, xkey)."""
    return seed_files(keys, tmp_path / "keys")
