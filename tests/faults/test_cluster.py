"""The users stream's leader is killed (SIGKILL) in a three-node cluster with an R3 bucket,
alone and under a connect storm (2,000 connects in flight).

The cluster comes from `tests/support/cluster.py`. The service and the probing clients use
only the two nodes that survive, so the service's own connection is never cut and every
request reaches it: what is measured is the store failing over under it. JetStream needs
about 5 s to elect a new leader (nats-server 2.15.1); meanwhile the users cache answers from
its copy, kept confirmed by a surviving replica's direct gets (README, "The users cache"):
the known user must be admitted again within `READMIT_WITHIN` (1 s) of the kill (it is, in
practice, never denied), and the revoked and unknown users denied throughout.

Two revocations just before the kill:
- `revoked_seen`: revoked, and denied once by the service (its copy holds the revocation),
  then the leader is killed: never admitted;
- `revoked_late`: revoked, and the leader killed the moment the write is acknowledged. If
  neither the watch nor the surviving replica the service reads had applied it when the leader
  died (followers apply a write a millisecond or two after the leader acknowledges it), no
  reachable copy of the bucket holds it until a new leader is elected, and the cache, like any
  reader, cannot know of it. The contract allows exactly that: such admits start before the
  new leader is seen by this test, plus the cache's 100 ms bound; any later one is wrong.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from tests.support.cluster import admin_connection, create_users_bucket, running_cluster
from tests.support.nats import Keys, new_user
from tests.support.rig import BOUND, FAULT_FLAGS, KNOWN_LOOPS, storm
from tests.support.service import record, serve_args, spawn, users_bucket
from tests.support.wait import eventually
from tests.support.witness import Outcome, Probes, Tally, Users, Witness, attempt

pytestmark = pytest.mark.slow

#: The contract: known users admitted again within 1 s of the leader's death.
READMIT_WITHIN = 1.0
#: A new leader is elected ~5 s after a crash; a hang fails, it is not timed.
ELECTED_WITHIN = 20.0


@pytest.mark.parametrize("loaded", [False, True], ids=["alone", "storm"])
async def test_stream_leader_killed(
    tmp_path: Path, files: dict[str, Path], keys: Keys, tally: Tally, loaded: bool
) -> None:
    users = Users()
    late_seed, late = new_user()
    seen_seed, seen = new_user()
    users.other |= {"revoked_late": late_seed, "revoked_seen": seen_seed}
    async with running_cluster(tmp_path, keys) as cluster:
        await create_users_bucket(cluster, files)
        # Followers serve direct gets once caught up; a fresh bucket's are not yet.
        await cluster.wait_direct_gets()
        nc = await admin_connection(cluster)
        svc = None
        witness = None
        try:
            kv = await users_bucket(nc)
            await kv.put(users.known[1], record("known", admin=True))
            await kv.put(users.revoked[1], record("revoked", admin=True, revoked=True))
            await kv.put(late, record("late", admin=True))
            await kv.put(seen, record("seen", admin=True))
            leader = await cluster.stream_leader(nc)
            first, second = (cluster.nodes[i] for i in range(3) if i != leader)
            svc = spawn(serve_args(first.url, files, *FAULT_FLAGS))
            await svc.await_event("ready")
            await svc.await_event("users_cache_live", users=4)
            witness = await Witness.open(second.url, keys)
            nodes = itertools.cycle([first.url, second.url])
            roles = ("known",) * KNOWN_LOOPS[loaded] + ("revoked", "unknown")
            async with storm(nc, svc, first.url, tmp_path, loaded):
                probes = Probes(witness, lambda: next(nodes), tally, users, roles=roles, pace=0)
                probes.start()
                revoked_probes: Probes | None = None
                try:
                    await eventually(lambda: probes.streak("known", 0.0) >= 2, 30)
                    await kv.put(seen, record("seen", admin=True, revoked=True))

                    async def denied_revoked() -> bool:
                        o = await attempt(witness, first.url, seen_seed, "check")
                        return o is not None and o.reason == "revoked"

                    await eventually(denied_revoked, 10)
                    # Revoked, acknowledged by the cluster, and the leader dies at once.
                    await kv.put(late, record("late", admin=True, revoked=True))
                    cluster.nodes[leader].kill()
                    killed = time.monotonic()
                    revoked_probes = Probes(
                        witness,
                        lambda: next(nodes),
                        tally,
                        users,
                        roles=("revoked_seen", "revoked_late"),
                        pace=0,
                    ).start()
                    new_leader: list[int] = []

                    async def elected() -> bool:
                        try:
                            new_leader.append(await cluster.stream_leader(nc))
                        except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                                AssertionError):  # NoLeader included  # fmt: skip
                            return False
                        return True

                    await eventually(elected, ELECTED_WITHIN)
                    elected_at = time.monotonic()
                    assert revoked_probes is not None
                    watched = revoked_probes

                    def enough() -> bool:
                        return len(probes.since(elected_at, "known")) >= 3 and all(
                            len(watched.since(elected_at, role)) >= 3
                            for role in ("revoked_seen", "revoked_late")
                        )

                    await eventually(enough, 30)
                finally:
                    await probes.stop()
                    if revoked_probes is not None:
                        await revoked_probes.stop()
            assert new_leader[0] != leader
            known = [(t - killed, o) for t, o in probes.seen if o.role == "known" and t >= killed]
            if loaded:
                # The storm's own timeouts (the server's, and the service's `store_timeout` when
                # a replica's answer comes too late) are the storm's own cost, not what is
                # measured here: counted, not checked. Any other deny of the known user still fails.
                slow = [o for _, o in known if not o.ours or o.reason == "store_timeout"]
                tally.notes["timeouts while the storm ran (not checked here)"] = len(slow)
                slow_ids = {id(o) for o in slow}
                known = [(dt, o) for dt, o in known if id(o) not in slow_ids]
                tally.unbound(tally.outcomes)
                tally.outcomes = [o for o in tally.outcomes if id(o) not in slow_ids and o.ours]
                assert any(o.admitted for dt, o in known if dt >= READMIT_WITHIN)
            first_admit = min((dt for dt, o in known if o.admitted), default=None)
            denied_after = [
                (round(dt, 3), o) for dt, o in known if dt >= READMIT_WITHIN and not o.admitted
            ]
            tally.notes["known: first admit after the kill (ms)"] = (
                None if first_admit is None else round(first_admit * 1000, 1)
            )
            tally.notes["known: denied after the kill"] = sum(1 for _, o in known if not o.admitted)
            tally.notes["new leader seen after (s)"] = round(elected_at - killed, 2)
            assert first_admit is not None and first_admit < READMIT_WITHIN
            excuse_what_the_cluster_lost(tally, svc.events("decision"))
            excused = {id(o) for o, _ in tally.excused}
            assert [(dt, o) for dt, o in denied_after if id(o) not in excused] == []
            # The contract's one allowance: a revocation no surviving copy held yet.
            in_election = [
                o
                for t, o in revoked_probes.seen
                if o.role == "revoked_late" and o.admitted and t < elected_at + BOUND
            ]
            tally.relabel(in_election, "revoked_late_unseen_in_election")
            tally.notes["revoked at the kill, admitted before the new leader"] = len(in_election)
            assert len(revoked_probes.since(elected_at, "revoked_late")) >= 3
            assert svc.proc.poll() is None
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
