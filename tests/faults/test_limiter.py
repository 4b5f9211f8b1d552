"""The failure limiter: 200 bad clients loop while real clients connect.

- 100 clients with unknown keys (a misconfigured fleet: 10 keys, each deployed on 10
  instances), each from its own loopback address: a host fails only at its own pace while a
  key fails ten times as often, so the key limit (`--fail-limit-key`, 10 per `--fail-window`)
  is the one that throttles them;
- 100 clients claiming the real users' keys with signatures of their own (a brute force),
  all from 127.0.0.2: a bad signature counts against the host only (anyone can claim a key),
  so the host limit (`--fail-limit-host`, 100) throttles them, and the real users they claim
  are not locked out.

The real clients connect from 127.0.0.1. Every client of the test runs on one machine; what
separates "bad" from "real" is the source address (127.0.0.0/8 is all local on Linux), which
is what nats-server reports as the client's host. The loops run in a process of their own
(`tests/support/badclients.py`), so their CPU competes with the server and the service (as a
real brute force would) but not with the event loop timing the real clients.

Asserted: no bad client admitted; every real client admitted; the limiter engaged for both
kinds; real users are never throttled. Their latency with and without the loop is recorded,
not asserted (speed is measured in bench/); the only bound is that they were admitted, which
means answered within the server's timeout. And, apart, what the host limit may never do: a
real client behind the brute force's address (a shared NAT, a load balancer, a proxy) is
admitted while the failing requests from that address are throttled, and requests with no
key at all count against nothing.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

from tests.support.badclients import connect_from
from tests.support.nats import Keys, NatsServer, ServerFactory, new_user
from tests.support.rig import Rig, rig
from tests.support.service import record, serve_args, spawn, users_bucket
from tests.support.wait import eventually
from tests.support.witness import BACKEND_TIMEOUT, Outcome, Tally, percentiles, tried

REAL_USERS = 5
REAL_CONNECTS = 60
BAD_UNKNOWN = 100
UNKNOWN_KEYS = 10
BAD_SIGNATURE = 100
#: An upper bound on the loop; the test ends it (closes its stdin) once it has measured.
LOOP_SECONDS = 30.0
BAD_HOST = "127.0.0.2"


async def real_clients(r: Rig, url: str, seeds: list[str], tally: Tally) -> list[Outcome]:
    """One after another, from 127.0.0.1."""
    return [
        await tried(tally, r.witness, url, seeds[i % len(seeds)], "known")
        for i in range(REAL_CONNECTS)
    ]


async def test_real_clients_keep_getting_in_while_200_bad_clients_loop(
    server: NatsServer, keys: Keys, tmp_path: Path, tally: Tally
) -> None:
    real = [new_user() for _ in range(REAL_USERS)]
    async with rig(server, keys, tmp_path, serve=None) as r:
        kv = await users_bucket(r.admin)
        for i, (_, pub) in enumerate(real):
            await kv.put(pub, record(f"real{i}", admin=True))
        # The limiter's defaults: 10 failures per key, 100 per host, per 10 s.
        svc = r.svc = spawn(
            serve_args(server.url, r.files, "--backend-timeout", str(BACKEND_TIMEOUT))
        )
        await svc.await_event("ready")
        await svc.await_event("users_cache_live", users=2 + REAL_USERS)
        seeds = [seed for seed, _ in real]

        quiet = await real_clients(r, server.url, seeds, tally)

        bad = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.badclients",
            "--port", str(server.port),
            "--duration", str(LOOP_SECONDS),
            "--unknown", str(BAD_UNKNOWN),
            "--unknown-keys", str(UNKNOWN_KEYS),
            "--bad-sig", str(BAD_SIGNATURE),
            "--bad-sig-from", BAD_HOST,
            *[arg for _, pub in real for arg in ("--claim", pub)],
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE,
        )  # fmt: skip
        loop_started = time.monotonic()
        assert bad.stdout is not None and bad.stdin is not None
        try:
            started = json.loads(await bad.stdout.readline())
            assert started["event"] == "started"

            def throttled(host_prefix: str) -> int:
                return sum(
                    1
                    for d in svc.events("decision")
                    if d["reason"] == "throttled" and d.get("host", "").startswith(host_prefix)
                )

            # Both limits have engaged before the real clients are timed.
            await eventually(lambda: throttled(BAD_HOST) > 0 and throttled("127.0.1.") > 0)
            loaded = await real_clients(r, server.url, seeds, tally)
            assert bad.returncode is None, "the loop ended before the real clients were done"
            bad.stdin.close()
            done = json.loads(await bad.stdout.readline())
            loop_seconds = time.monotonic() - loop_started
            assert await asyncio.wait_for(bad.wait(), 10) == 0
        finally:
            if bad.returncode is None:
                bad.kill()
                await bad.wait()

        assert done["admitted"] == 0
        assert all(o.admitted for o in quiet + loaded)
        decisions = svc.events("decision")
        real_keys = {pub for _, pub in real}
        from_real_host = [d for d in decisions if d.get("host") == "127.0.0.1"]
        assert {d["reason"] for d in from_real_host if d["client"] in real_keys} == {"admit"}
        bad_decisions = [
            d for d in decisions if d.get("host", "").startswith(("127.0.1.", BAD_HOST))
        ]
        reasons = Counter(d["reason"] for d in bad_decisions)
        assert set(reasons) <= {"unknown_user", "bad_signature", "throttled"}
        assert reasons["throttled"] > reasons["unknown_user"] + reasons["bad_signature"]
        for d in bad_decisions:
            tally.add(Outcome("bad", False, d["reason"], d["latency_ms"] / 1000))
        tally.notes.update(
            {
                "bad attempts (errors)": f"{done['attempts']} ({done['errors']})"
                f" in {loop_seconds:.1f} s",
                "bad decisions by reason": dict(reasons),
                "real latency quiet (ms)": percentiles([o.elapsed for o in quiet]),
                "real latency with the loop (ms)": percentiles([o.elapsed for o in loaded]),
            }
        )
        tally.check()


async def test_a_real_user_behind_the_brute_forces_address_is_never_throttled_by_it(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path
) -> None:
    """A client whose signature verifies is never refused for its host; the host is throttled
    only for requests that fail and carry a key, and only after the signature is checked: 20
    bare `CONNECT {}`s from the same host would otherwise lock the real user out here. With a
    window of an hour no token comes back during the test, so the outcome does not depend on
    the machine's speed."""
    server = nats_server()
    flags = ("--fail-limit-host", "20", "--fail-window", "3600")
    async with rig(server, keys, tmp_path, serve=flags) as r:
        assert r.svc is not None
        svc = r.svc
        known_seed, known = r.users.known
        attacker_seed, _ = new_user()
        for _ in range(30):  # no key at all: nothing to count
            admitted, _ = await connect_from(server.port, BAD_HOST, attacker_seed, bare=True)
            assert not admitted
        assert (await connect_from(server.port, BAD_HOST, known_seed))[0]
        for _ in range(20):  # the host's 20 failures, each decided before the next
            admitted, _ = await connect_from(server.port, BAD_HOST, attacker_seed, claim=known)
            assert not admitted
        throttled, _ = await connect_from(server.port, BAD_HOST, attacker_seed, claim=known)
        behind_the_nat, _ = await connect_from(server.port, BAD_HOST, known_seed)
        from_elsewhere, _ = await connect_from(server.port, "127.0.0.1", known_seed)
        assert (throttled, behind_the_nat, from_elsewhere) == (False, True, True)
        await eventually(lambda: len(svc.events("decision")) == 54)
        seen = [(d["host"], d["reason"]) for d in svc.events("decision")]
        assert seen == (
            [(BAD_HOST, "no_nkey")] * 30
            + [(BAD_HOST, "admit")]
            + [(BAD_HOST, "bad_signature")] * 20
            + [(BAD_HOST, "throttled"), (BAD_HOST, "admit"), ("127.0.0.1", "admit")]
        )
