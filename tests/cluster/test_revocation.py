"""Live revocation on the 3-node cluster: every live connection of
a revoked user, on whichever node and admitted by whichever replica, is closed within 1 s of
`callout users revoke`; other users' connections are untouched; and each connection is kicked
once (each replica kicks only what it admitted)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import admin_connection, create_users_bucket, running_cluster
from tests.support.nats import Keys, closed, new_user, raw_connect
from tests.support.service import (
    record,
    run_cli,
    serve_args,
    start_replicas,
    users_bucket,
    write_seed,
)

pytestmark = pytest.mark.slow


async def test_revoke_closes_sessions_on_every_node_within_1s(
    tmp_path: Path, files: dict[str, Path], keys: Keys
) -> None:
    system_seed, system_pub = new_user()
    files["system"] = write_seed(tmp_path / "keys" / "system.nk", system_seed)
    alice_seed, alice = new_user()
    bob_seed, bob = new_user()
    async with running_cluster(tmp_path, keys, sys_nkey=system_pub) as cluster:
        await create_users_bucket(cluster, files)
        nc = await admin_connection(cluster)
        replicas = []
        try:
            kv = await users_bucket(nc)
            await kv.put(alice, record("alice"))
            await kv.put(bob, record("bob"))
            args = serve_args(cluster.urls, files, "--system-nkey-seed-file", str(files["system"]))
            replicas = await start_replicas(args)
            await asyncio.gather(*(r.await_event("users_cache_live") for r in replicas))
            # Two connections of alice through each node, one of bob.
            alice_conns: list[Any] = []
            for node in cluster.nodes:
                for _ in range(2):
                    result = await raw_connect(node.url, alice_seed, keep_open=True)
                    assert result.admitted, result.error
                    alice_conns.append(result.conn)
            bob_conn = await raw_connect(cluster.nodes[1].url, bob_seed, keep_open=True)
            assert bob_conn.admitted and bob_conn.conn is not None
            admitted_by = {
                i for i, r in enumerate(replicas) for e in r.events("decision")
                if e["client"] == alice and e["decision"] == "admit"
            }  # fmt: skip

            revoke = run_cli(
                "users", "--nats-url", cluster.nodes[0].url,
                "--nkey-seed-file", str(files["service"]), "revoke", alice,
            )  # fmt: skip
            assert revoke.returncode == 0, revoke.stderr
            revoked_at = time.monotonic()
            await asyncio.gather(*(closed(conn) for conn in alice_conns))
            elapsed = time.monotonic() - revoked_at
            assert elapsed < 1.0, f"sessions closed {elapsed:.2f}s after the revoke"
            assert await bob_conn.conn.ping() is None
            assert not (await raw_connect(cluster.nodes[2].url, alice_seed)).admitted

            # Every replica that admitted alice kicked its own connections, and only those:
            # six connections, six kicks in all.
            events = [
                await replicas[i].await_event("revoked_sessions", client=alice)
                for i in sorted(admitted_by)
            ]
            assert sum(e["closed"] for e in events) == 6
            assert sum(e["tried"] for e in events) == 6
        finally:
            for replica in replicas:
                replica.terminate()
            await nc.close()
