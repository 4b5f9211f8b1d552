"""TLS for the service's own connection, against a TLS-only nats-server 2.15.1 with
certificates made in the test: server-authenticated TLS and mutual TLS (`verify: true`).
The service runs as `callout serve` (a subprocess) so the `--tls-*` flags are what is tested;
`callout users` uses the same flags. Getting TLS wrong is one line on stderr, not a traceback.

Also pinned here: with TLS configured and no `authorization.timeout`, the server gives the
callout 3 s instead of 2 (docs/protocol.md §3, "Server-side timeout"), visible as the request's
`exp - iat`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from tests.support.admission import SERVICE_ERROR, granted, jwt_claims, perms, user_info
from tests.support.certs import Pair, Pki, make_pki
from tests.support.nats import (
    AUTH_SUBJECT,
    Keys,
    NatsServer,
    auth_errors,
    free_port,
    nats_connect,
    new_user,
    next_event,
    render_config,
)
from tests.support.service import APP, Subprocess, run_cli, seed_files, serve_args, spawn

USER_INFO = "$SYS.REQ.USER.INFO"
AUTH_VIOLATION = "Authorization Violation"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One CA and its certificates for the whole module: only the servers differ per test."""
    return make_pki(tmp_path_factory.mktemp("pki"))


DEPLOY_TLS = Path(__file__).resolve().parents[2] / "deploy" / "nats-tls.conf"


def tls_block(pki: Pki, *, verify: bool) -> str:
    """deploy/nats-tls.conf, its paths swapped for this test's certificates: the servers here
    run the documented block itself. `verify=False` drops its `verify: true` line, as its
    comment says to for server-authenticated TLS."""
    text = DEPLOY_TLS.read_text()
    for name, path in (
        ("server.pem", pki.server.cert),
        ("server.key", pki.server.key),
        ("ca.pem", pki.ca.cert),
    ):
        placeholder = json.dumps(f"/etc/nats/tls/{name}")
        assert text.count(placeholder) == 1, placeholder
        text = text.replace(placeholder, json.dumps(str(path)))
    verify_line = "\n  verify: true\n"
    assert text.count(verify_line) == 1
    return text if verify else text.replace(verify_line, "\n")


def server_config(
    keys: Keys, port: int, workdir: Path, tls: str | None, *, jetstream: bool = True
) -> str:
    """Config mode with the callout (tests.support.nats), plus a top-level `tls` block, and no
    `authorization.timeout`: the server's default is part of what is tested."""
    config = render_config(
        port=port,
        keys=keys,
        store_dir=workdir / "js",
        jetstream=jetstream,
        extra=tls or "",
    )
    timeout_line = "  timeout: 2.0\n"
    assert timeout_line in config
    return config.replace(timeout_line, "", 1)


Servers = Callable[..., Awaitable[NatsServer]]


@pytest.fixture
async def servers(tmp_path: Path, keys: Keys, pki: Pki) -> AsyncIterator[Servers]:
    """Factory: `await servers(verify=...)` -> a started TLS-only server (`tls=False`: none)."""
    started: list[NatsServer] = []

    async def start(
        *, tls: bool = True, verify: bool = False, jetstream: bool = True
    ) -> NatsServer:
        workdir = tmp_path / f"server{len(started)}"
        port = free_port()
        block = tls_block(pki, verify=verify) if tls else None
        config = server_config(keys, port, workdir, block, jetstream=jetstream)
        server = NatsServer(config, port=port, workdir=workdir)
        started.append(server)
        return await server.astart()

    try:
        yield start
    finally:
        for server in reversed(started):
            await server.astop()


def tls_flags(pki: Pki, client: Pair | None) -> list[str]:
    flags = ["--tls-ca", str(pki.ca.cert)]
    if client is not None:
        flags += ["--tls-cert", str(client.cert), "--tls-key", str(client.key)]
    return flags


@dataclass
class Watch:
    """A bystander in the callout account: the requests the server sends, decoded."""

    requests: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.requests.get(), 5)


async def watch(nc: Client, *, answer_empty: bool = False) -> Watch:
    """Watch `$SYS.REQ.USER.AUTH`; with `answer_empty`, also deny every request at once (an
    empty body, docs/protocol.md §3 check 1), standing in for a service."""
    seen = Watch()

    async def on_request(msg: Msg) -> None:
        seen.requests.put_nowait(jwt_claims(msg.data))
        if answer_empty:
            await msg.respond(b"")

    await nc.subscribe(AUTH_SUBJECT, cb=on_request)
    await nc.flush()
    return seen


async def connect_user(server: NatsServer, seed: str, context: ssl.SSLContext | None) -> Client:
    extra: dict[str, Any] = {"tls": context} if context is not None else {}
    return await nats_connect(server.url, seed, **extra)


async def assert_denied(server: NatsServer, seed: str, context: ssl.SSLContext | None) -> None:
    with pytest.raises(nats.errors.Error) as denied:
        nc = await connect_user(server, seed, context)
        await nc.close()
    assert AUTH_VIOLATION.lower() in str(denied.value).lower()


@contextlib.asynccontextmanager
async def service(args: list[str]) -> AsyncIterator[Subprocess]:
    handle = spawn(args)
    try:
        await handle.await_event("ready")
        yield handle
    finally:
        handle.kill()  # shutdown is tested elsewhere (tests/cli)


# ---------------------------------------------------------------------------------------------
# admit and deny over TLS
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verify", [True, False], ids=["mutual-tls", "server-tls"])
async def test_service_and_users_command_over_tls(
    servers: Servers, keys: Keys, pki: Pki, tmp_path: Path, verify: bool
) -> None:
    server = await servers(verify=verify)
    files = seed_files(keys, tmp_path / "keys")
    # Under mutual TLS every client shows a certificate; otherwise trusting the CA is enough.
    service_cert = pki.client if verify else None
    user_context = pki.client_context(pki.user if verify else None)
    seed, pub = new_user()
    stranger, stranger_pub = new_user()

    added = await asyncio.to_thread(
        run_cli,
        "users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]),
        *tls_flags(pki, service_cert),
        "add", pub, "--name", "alice", "--pub-allow", USER_INFO, "--sub-allow", "_INBOX.>",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr

    admin = await nats_connect(server.url, keys.service_seed, tls=pki.client_context(service_cert))
    try:
        events = await auth_errors(admin)
        seen = await watch(admin)
        async with service(serve_args(server, files, *tls_flags(pki, service_cert))):
            nc = await connect_user(server, seed, user_context)
            try:
                info = await user_info(nc)
            finally:
                await nc.close()
            assert info["account"] == APP
            assert info["user"] == "alice"
            assert granted(info) == perms([USER_INFO], [], ["_INBOX.>"], [])

            request = (await seen.next())["nats"]
            assert request["connect_opts"]["nkey"] == pub
            client_tls = request["client_tls"]
            if verify:
                # The server passes the verified chain on: leaf first (docs/protocol.md §1).
                assert client_tls["verified_chains"][0][0] == pki.user.cert.read_text()
            else:
                assert "verified_chains" not in client_tls

            await assert_denied(server, stranger, user_context)
            event = await next_event(
                events, lambda e: e.get("client", {}).get("user") == stranger_pub
            )
            assert event["reason"] == SERVICE_ERROR + "unknown_user"
    finally:
        await admin.close()


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_default_callout_timeout_is_3s_with_tls(
    servers: Servers, keys: Keys, pki: Pki, tls: bool
) -> None:
    server = await servers(tls=tls, jetstream=False)
    context = pki.client_context() if tls else None
    admin = await connect_user(server, keys.service_seed, context)
    spans: list[int] = []
    try:
        seen = await watch(admin, answer_empty=True)
        for _ in range(2):
            seed, _ = new_user()
            await assert_denied(server, seed, context)
            request = await seen.next()
            spans.append(request["exp"] - request["iat"])
    finally:
        await admin.close()
    # exp = now + timeout and iat = a few microseconds later, each truncated to the second, so
    # exp - iat is the timeout, or one less if a second boundary fell in between: the larger of
    # two requests is the timeout (docs/protocol.md §1, `exp`).
    assert max(spans) == (3 if tls else 2)


# ---------------------------------------------------------------------------------------------
# TLS configuration mistakes: one line, no traceback, no hang
# ---------------------------------------------------------------------------------------------
# A correct command fails in well under a second; the bound only turns a hang into a failure.
CLI_TIMEOUT = 15.0


def one_line(args: list[str]) -> str:
    done = run_cli(*args, timeout=CLI_TIMEOUT)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def command_args(
    command: str, server: NatsServer, files: dict[str, Path], tls: list[str]
) -> list[str]:
    if command == "serve":
        return serve_args(server, files, *tls)
    return [
        "users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]), *tls, "list",
    ]  # fmt: skip


@pytest.mark.parametrize("command", ["serve", "users"])
@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        # The server's certificate is not signed by anything the system trusts.
        ("no-ca", "certificate verify failed"),
        ("wrong-ca", "certificate verify failed"),
        # The right CA, but no client certificate for a server that requires one. Under TLS 1.3
        # the client's handshake completes first: the server's alert or the socket it closes
        # reaches nats-py, whichever comes first, so only the one line is certain.
        ("no-client-cert", ""),
    ],
    ids=["no-ca", "wrong-ca", "no-client-cert"],
)
async def test_tls_handshake_mistakes_fail_with_one_line(
    servers: Servers,
    keys: Keys,
    pki: Pki,
    tmp_path: Path,
    command: str,
    mistake: str,
    expected: str,
) -> None:
    server = await servers(verify=True, jetstream=False)
    files = seed_files(keys, tmp_path / "keys")
    tls = {
        "no-ca": [],
        "wrong-ca": ["--tls-ca", str(pki.rogue_ca.cert)],
        "no-client-cert": tls_flags(pki, None),
    }[mistake]
    line = await asyncio.to_thread(one_line, command_args(command, server, files, tls))
    assert server.url in line
    assert expected in line


@pytest.mark.parametrize("command", ["serve", "users"])
def test_tls_file_mistakes_fail_with_one_line_before_connecting(
    keys: Keys, pki: Pki, tmp_path: Path, files: dict[str, Path], command: str
) -> None:
    nowhere = NatsServer("", port=1, workdir=tmp_path / "nowhere")  # never started
    half = ["--tls-ca", str(pki.ca.cert), "--tls-cert", str(pki.client.cert)]
    assert "--tls-key" in one_line(command_args(command, nowhere, files, half))
    missing = str(tmp_path / "missing.pem")
    line = one_line(command_args(command, nowhere, files, ["--tls-ca", missing]))
    assert "--tls-ca" in line and missing in line
