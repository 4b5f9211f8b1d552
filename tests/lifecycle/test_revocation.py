"""Live revocation against a real nats-server: revoking (or deleting) a record closes that
user's live connections; other users' stay up; --keep-sessions opts out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.support.nats import Keys, closed, raw_connect
from tests.support.service import revocable, run_cli, seed_files, serve_args, spawn


async def test_revoke_closes_live_connections_within_1s(revocation_setup: Any, keys: Keys) -> None:
    server, files = revocation_setup
    async with revocable(server, files, keys, "alice", "bob") as (service, _, users):
        (alice_seed, alice), (bob_seed, _) = users
        alice_conns = [await raw_connect(server.url, alice_seed, keep_open=True) for _ in range(3)]
        bob_conn = await raw_connect(server.url, bob_seed, keep_open=True)
        assert all(c.admitted for c in alice_conns) and bob_conn.admitted
        result = run_cli(
            "users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]),
            "revoke", alice,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        revoked_at = time.monotonic()
        for conn in alice_conns:
            assert conn.conn is not None
            await closed(conn.conn)
        assert time.monotonic() - revoked_at < 1.0
        assert bob_conn.conn is not None and await bob_conn.conn.ping() is None  # untouched
        again = await raw_connect(server.url, alice_seed)
        assert not again.admitted
        event = await service.await_event("revoked_sessions", client=alice)
        assert event["closed"] == 3


async def test_delete_closes_and_keep_sessions_opts_out(revocation_setup: Any, keys: Keys) -> None:
    server, files = revocation_setup
    async with revocable(server, files, keys, "carol", "dave") as (service, kv, users):
        (carol_seed, carol), (dave_seed, dave) = users
        carol_conn = await raw_connect(server.url, carol_seed, keep_open=True)
        dave_conn = await raw_connect(server.url, dave_seed, keep_open=True)
        assert carol_conn.admitted and dave_conn.admitted
        result = run_cli(
            "users", "--nats-url", server.url, "--nkey-seed-file", str(files["service"]),
            "revoke", "--keep-sessions", dave,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        await kv.delete(carol)
        assert carol_conn.conn is not None
        await closed(carol_conn.conn)
        await service.await_event("revoked_sessions", client=carol)
        # dave's revocation was seen (a new connect is denied) but his session was kept.
        assert not (await raw_connect(server.url, dave_seed)).admitted
        assert dave_conn.conn is not None and await dave_conn.conn.ping() is None
        assert not service.events("revoked_sessions") or all(
            e["client"] != dave for e in service.events("revoked_sessions")
        )


async def test_without_system_identity_revocation_is_new_connections_only(
    nats_server: Any, keys: Keys, tmp_path: Path
) -> None:
    server = nats_server()
    files = seed_files(keys, tmp_path / "keys")
    service = spawn(serve_args(server, files))
    try:
        warning = await service.await_event("revocation_new_connections_only")
        assert warning["level"] == "warning"
        assert len(service.events("revocation_new_connections_only")) == 1
    finally:
        service.terminate()
