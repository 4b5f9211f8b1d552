"""The image's HEALTHCHECK script (deploy/compose/healthcheck.py), run as the container runs it:
unhealthy until a connection to a port of CALLOUT_NATS_URL is established, healthy while one
is, unhealthy again once it is gone. (On this host, unlike in the container, /proc/net/tcp
shows every process's sockets; a fresh listening port keeps others out of the picture.)
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.support.compose import REPO

SCRIPT = REPO / "deploy/compose/healthcheck.py"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def healthcheck(urls: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CALLOUT_NATS_URL"}
    if urls is not None:
        env["CALLOUT_NATS_URL"] = urls
    return subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthy_only_while_connected_to_a_listed_server(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    urls = f"nats://nats-1:1,nats://127.0.0.1:{port}"

    before = healthcheck(urls)
    assert before.returncode == 1
    assert str(port) in before.stdout

    with socket.create_connection(("127.0.0.1", port)):
        assert healthcheck(urls).returncode == 0
        assert healthcheck(f"127.0.0.1:{port}").returncode == 0  # no scheme, as NATS allows
        assert healthcheck("nats://127.0.0.1:1").returncode == 1  # another server: not ours

    assert healthcheck(urls).returncode == 1


def test_ports_are_read_from_the_url_list_with_the_nats_default() -> None:
    spec = importlib.util.spec_from_file_location("callout_healthcheck", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.nats_ports("nats://nats-1:4222,nats://nats-2:5222, nats-3") == {4222, 5222}
    assert module.nats_ports("tls://a:7422,,nats://b") == {7422, 4222}
    assert module.nats_ports("") == set()
