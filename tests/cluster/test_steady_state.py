"""Three clustered nodes, the users bucket with 3 replicas, two `callout serve` replicas
connected with all three URLs:

- steady state: through each of the three nodes an allowed user is admitted (into the record's
  account), a revoked and an unknown user are denied, for the right reason, and requests from
  every node reach the queue group;
- a user added, then revoked, through node 1 takes effect at once for connects through node 3
  (lookups read the stream leader, so an acknowledged write is what the next lookup sees).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cluster import (
    admin_connection,
    connect_via,
    create_users_bucket,
    decisions,
    running_cluster,
)
from tests.support.nats import Keys, new_user
from tests.support.service import APP, record, run_cli, serve_args, start_replicas, users_bucket
from tests.support.wait import eventually

pytestmark = pytest.mark.slow


async def test_every_node_admits_allowed_users_and_denies_the_rest(
    tmp_path: Path, files: dict[str, Path], keys: Keys
) -> None:
    alice_seed, alice = new_user()
    root_seed, root = new_user()
    revoked_seed, revoked = new_user()
    stranger_seed, stranger = new_user()
    async with running_cluster(tmp_path, keys) as cluster:
        await create_users_bucket(cluster, files)
        nc = await admin_connection(cluster)
        replicas = []
        try:
            info = await cluster.stream_info(nc)
            assert info["config"]["num_replicas"] == 3
            peers = {info["cluster"]["leader"]} | {r["name"] for r in info["cluster"]["replicas"]}
            assert peers == {"n1", "n2", "n3"}

            kv = await users_bucket(nc)
            await kv.put(alice, record("alice", pub_allow=["orders.>"], sub_allow=["_INBOX.>"]))
            await kv.put(root, record("root", admin=True))
            await kv.put(revoked, record("gone", revoked=True))
            replicas = await start_replicas(serve_args(cluster.urls, files))

            cases = [
                (alice_seed, alice, True, "admit"),
                (root_seed, root, True, "admit"),
                (revoked_seed, revoked, False, "revoked"),
                (stranger_seed, stranger, False, "unknown_user"),
            ]
            expected: list[tuple[str, str]] = []
            server_ids: set[str] = set()
            for node in cluster.nodes:
                for seed, public, admit, reason in cases:
                    result = await connect_via(node, seed)
                    assert result.admitted is admit, (node.url, reason, result.error)
                    server_ids.add(result.info["server_id"])
                    expected.append((public, reason))

            await eventually(lambda: len(decisions(replicas)) == len(expected))
            lines = decisions(replicas)
            assert sorted((d["client"], d["reason"]) for d in lines) == sorted(expected)
            assert {d["account"] for d in lines if d["decision"] == "admit"} == {APP}
            # Each node's requests reached the queue group, whichever node a replica is on.
            assert len(server_ids) == 3
            assert {d["server"] for d in lines} == server_ids
        finally:
            for replica in replicas:
                replica.kill()
            await nc.close()


async def test_user_added_and_revoked_through_node_1_applies_through_node_3(
    tmp_path: Path, files: dict[str, Path], keys: Keys
) -> None:
    bob_seed, bob = new_user()
    async with running_cluster(tmp_path, keys) as cluster:
        await create_users_bucket(cluster, files)
        first, third = cluster.nodes[0], cluster.nodes[2]
        service_seed = str(files["service"])
        users_via_first = ["users", "--nats-url", first.url, "--nkey-seed-file", service_seed]
        replicas = await start_replicas(serve_args(cluster.urls, files))
        try:
            before = await connect_via(third, bob_seed)
            assert not before.admitted

            added = run_cli(*users_via_first, "add", bob, "--name", "bob")
            assert added.returncode == 0, added.stderr
            # No retry, no wait: the first connect after the write must see it.
            after_add = await connect_via(third, bob_seed)
            assert after_add.admitted, after_add.error

            revoked = run_cli(*users_via_first, "revoke", bob)
            assert revoked.returncode == 0, revoked.stderr
            after_revoke = await connect_via(third, bob_seed)
            assert not after_revoke.admitted
            assert after_revoke.error == "Authorization Violation"

            await eventually(lambda: len(decisions(replicas)) == 3)
            lines = sorted(decisions(replicas), key=lambda d: float(d["ts"]))
            assert [(d["client"], d["reason"]) for d in lines] == [
                (bob, "unknown_user"),
                (bob, "admit"),
                (bob, "revoked"),
            ]
            # All three requests came from node 3.
            assert {d["server"] for d in lines} == {after_add.info["server_id"]}
        finally:
            for replica in replicas:
                replica.kill()
