from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.clients import Client, Deployment, Missing, go_client, js_client
from tests.support.nats import NatsServer, free_port, make_keys, new_user, render_config
from tests.support.service import run_cli, seed_files, serve_args, spawn, write_seed

_BUILT: dict[str, Client | Missing] = {}


@pytest.fixture(scope="session", params=["go", "js"])
def client(request: pytest.FixtureRequest) -> Client:
    """Each real client, built or found once per session."""
    name: str = request.param
    if name not in _BUILT:
        try:
            _BUILT[name] = go_client() if name == "go" else js_client()
        except Missing as exc:
            _BUILT[name] = exc
    found = _BUILT[name]
    if isinstance(found, Missing):
        if os.environ.get("CI") == "true":  # CI installs them: missing is a failure there
            pytest.fail(f"{name} client: {found}")
        pytest.skip(f"{name} client: {found}")
    return found


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One nats-server and one callout (with a system identity: revocation kicks) shared by
    the module's tests; each test uses keys of its own."""
    work = tmp_path_factory.mktemp("clients")
    keys = make_keys()
    system_seed, system_pub = new_user()
    port = free_port()
    config = render_config(port=port, keys=keys, store_dir=work / "js", sys_nkey=system_pub)
    server = NatsServer(config, port=port, workdir=work / "server", store_dir=work / "js").start()
    files = seed_files(keys, work / "keys")
    system = write_seed(work / "keys" / "system.nk", system_seed)
    # The users bucket first (`users list` creates it), so the service's cache goes live.
    made = run_cli(
        "users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]), "list"
    )
    assert made.returncode == 0, made.stderr
    service = spawn(serve_args(server, files, "--system-nkey-seed-file", str(system)))
    try:
        service.wait_for("users_cache_live", timeout=30)
        seeds = work / "seeds"
        seeds.mkdir()
        yield Deployment(server, service, keys, seeds)
    finally:
        service.terminate()
        server.stop()
