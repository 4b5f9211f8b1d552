"""The users stream's leader is killed (SIGKILL) in a three-node cluster with an R3 bucket.

The cluster comes from `tests/cluster/cluster.py` (used read-only). The service and the probing
clients use only the two nodes that survive, so the service's own connection is never cut and
every request reaches it: what is measured is the store failing over under it. Until JetStream
elects a new leader (about 5 s after a crash in nats-server 2.15.1), lookups find no leader and
the known user is denied `store_timeout`, answered at the service's deadline; auth resumes
after the election on its own.

A user revoked just before the kill is probed too: if the leader dies between acknowledging
the revocation and delivering it to the users cache's watch, the cache admits that user until
its copy is too old to trust (`CACHE_STALENESS`: by design), never later.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from tests.cluster.cluster import admin_connection, create_users_bucket, running_cluster
from tests.faults.rig import FAULT_FLAGS
from tests.faults.scenario import (
    CACHE_STALENESS,
    Outcome,
    Probes,
    Tally,
    Users,
    Witness,
    eventually,
    serve_cmd,
)
from tests.harness import Keys, new_user
from tests.service import record, seed_files, spawn, users_bucket

pytestmark = pytest.mark.slow

#: Election after a crash (~5 s) plus lookups already waiting; a hang fails, it is not timed.
RECOVER_WITHIN = 20.0


async def test_stream_leader_killed(tmp_path: Path, keys: Keys, tally: Tally) -> None:
    files = seed_files(keys, tmp_path / "keys")
    users = Users()
    late_seed, late = new_user()
    users.other["revoked_late"] = late_seed
    async with running_cluster(tmp_path, keys) as cluster:
        await create_users_bucket(cluster, files)
        nc = await admin_connection(cluster)
        svc = None
        witness = None
        try:
            kv = await users_bucket(nc)
            await kv.put(users.known[1], record("known", admin=True))
            await kv.put(users.revoked[1], record("revoked", admin=True, revoked=True))
            await kv.put(late, record("late", admin=True))
            leader = await cluster.stream_leader(nc)
            first, second = (cluster.nodes[i] for i in range(3) if i != leader)
            svc = spawn(serve_cmd(first.url, files, *FAULT_FLAGS))
            await svc.await_event("ready")
            await svc.await_event("users_cache_live", users=3)
            witness = await Witness.open(second.url, keys)
            nodes = itertools.cycle([first.url, second.url])
            late_probes: Probes | None = None
            probes = Probes(
                witness,
                lambda: next(nodes),
                tally,
                users,
                roles=("known", "revoked", "unknown"),
            ).start()
            try:
                await eventually(lambda: probes.streak("known", 0.0) >= 2)
                # Revoked, acknowledged by the cluster, and the leader dies at once.
                await kv.put(late, record("late", admin=True, revoked=True))
                revoked = time.monotonic()
                cluster.nodes[leader].kill()
                killed = time.monotonic()
                late_probes = Probes(
                    witness, lambda: next(nodes), tally, users, roles=("revoked_late",)
                ).start()

                new_leader: list[int] = []

                async def elected() -> bool:
                    try:
                        new_leader.append(await cluster.stream_leader(nc))
                    except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                            AssertionError):  # NoLeader included  # fmt: skip
                        return False
                    return True

                await eventually(elected, RECOVER_WITHIN)
                await eventually(lambda: probes.streak("known", killed) >= 3, RECOVER_WITHIN)
                recovered = time.monotonic() - killed
            finally:
                await probes.stop()
                if late_probes is not None:
                    await late_probes.stop()
            assert new_leader[0] != leader
            assert len(late_probes.since(revoked + CACHE_STALENESS)) >= 3
            tally.notes["revoked-before-the-kill admits within the staleness bound"] = (
                late_probes.within_staleness("revoked_late", revoked)
            )
            assert probes.denied_with("known", "store_timeout", killed)
            assert all(len(probes.since(killed, role)) >= 3 for role in probes.roles)
            assert recovered < RECOVER_WITHIN
            tally.notes["admitted again after (s)"] = round(recovered, 2)
            assert svc.proc.poll() is None
            excuse_what_the_cluster_lost(tally, svc.events("decision"))
            tally.check()
        finally:
            if svc is not None:
                svc.kill()
            if witness is not None:
                await witness.close()
            await nc.close()


def excuse_what_the_cluster_lost(tally: Tally, decisions: list[dict[str, Any]]) -> None:
    """Once in about 20 suite runs, right after the kill, 2 requests ended at the server's
    timeout and an auth event never reached the witness (that run's logs were not kept). If
    the cluster loses messages while it reorganises (a request never delivered, a deny or an
    event lost on the way back), the service cannot answer what it never got; what it did
    get, it must have answered in time.
    Its log says which: a decision line for every request, with the connection's `server`
    and `cid`. Only a request with no decision line, or a deny logged within the bound, is
    excused (and shown apart in the summary); a late answer or a drop stays a failure."""
    logged = {(str(d.get("server")), d.get("cid")): d for d in decisions}
    never_reached: list[Outcome] = []
    answered_in_time: list[Outcome] = []
    for o in tally.unanswered:
        decision = logged.get(o.conn) if o.conn is not None else None
        if decision is None:
            never_reached.append(o)
        elif decision["decision"] == "deny" and decision["latency_ms"] / 1000 <= tally.bound:
            answered_in_time.append(o)
    tally.excuse(never_reached, "the request never reached the service (lost between nodes)")
    tally.excuse(answered_in_time, "denied in time; the deny or its event was lost between nodes")
    assert len(tally.excused) <= len(tally.outcomes) // 10, "more than a blip"


def test_only_what_the_service_never_got_or_answered_in_time_is_excused() -> None:
    tally = Tally("t", bound=0.6)
    fine = [Outcome("known", True, "admit", 0.01, conn=("S", i)) for i in range(40)]
    never_got = Outcome("known", False, "timeout", 2.0, conn=("S", 100))
    event_lost = Outcome("unknown", False, "no_event", 0.002, conn=("S", 101))
    held_too_long = Outcome("known", False, "timeout", 2.0, conn=("S", 102))
    slow_deny = Outcome("known", False, "timeout", 2.0, conn=("S", 103))
    for o in [*fine, never_got, event_lost, held_too_long, slow_deny]:
        tally.add(o)
    decisions = [
        {"server": "S", "cid": 101, "decision": "deny", "latency_ms": 1.5},
        {"server": "S", "cid": 102, "decision": "drop", "latency_ms": 2000.0},
        {"server": "S", "cid": 103, "decision": "deny", "latency_ms": 900.0},
    ]
    excuse_what_the_cluster_lost(tally, decisions)
    assert [o for o, _ in tally.excused] == [never_got, event_lost]
    assert tally.unanswered == [held_too_long, slow_deny]
