"""`callout serve` as real processes: two replicas in one queue group (one of them killed),
exactly one reply per request, and the decision log line (issue, "Logs").

A bystander connection in the callout account sees every request (`$SYS.REQ.USER.AUTH`) and
every reply (the server's reply inboxes `$SYS._INBOX.>` are ordinary subjects there), so
replies are counted per request on the wire. A second reply that is an error would also disconnect
an admitted client (docs/protocol.md §3 table, "two replies"): every admitted connection is pinged
at the end.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from nats.aio.msg import Msg

from tests.support.admission import deployment, user_info
from tests.support.nats import (
    Keys,
    RawConn,
    ServerFactory,
    nats_connect,
    new_user,
    next_event,
    raw_connect,
)
from tests.support.service import (
    Subprocess,
    Wire,
    record,
    seed_files,
    serve_args,
    start_replicas,
    users_bucket,
    watch,
)
from tests.support.wait import eventually

SYS_USER = ("sys", "pw")


async def all_answered(wire: Wire, n: int, timeout: float = 10.0) -> None:
    async def wait() -> None:
        while not (len(wire.inboxes) >= n and wire.answered() >= n):
            wire.changed.clear()
            await wire.changed.wait()

    await asyncio.wait_for(wait(), timeout)


def decided(replica: Subprocess) -> list[str]:
    return [d["client"] for d in replica.events("decision")]


async def connect_all(url: str, seeds: Sequence[str]) -> list[RawConn]:
    results = await asyncio.gather(*(raw_connect(url, s, keep_open=True) for s in seeds))
    assert [r.error for r in results if not r.admitted] == []
    conns = [r.conn for r in results]
    assert all(c is not None for c in conns)
    return [c for c in conns if c is not None]


async def test_two_replicas_share_the_load_and_survive_one_killed(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path
) -> None:
    server = nats_server(sys_user=SYS_USER)
    files = seed_files(keys, tmp_path / "keys")
    users = [new_user() for _ in range(50)]
    admin = await nats_connect(server.url, keys.service_seed)
    sys_nc = await nats_connect(server.url, user=SYS_USER[0], password=SYS_USER[1])
    replicas: list[Subprocess] = []
    conns: list[RawConn] = []
    try:
        kv = await users_bucket(admin)
        for i, (_, pub) in enumerate(users):
            await kv.put(pub, record(f"u{i}", admin=True))
        wire = await watch(admin)
        disconnects: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_disconnect(msg: Msg) -> None:
            disconnects.put_nowait(orjson.loads(msg.data))

        await sys_nc.subscribe("$SYS.ACCOUNT.AUTH.DISCONNECT", cb=on_disconnect)
        await sys_nc.flush()

        replicas = await start_replicas(serve_args(server, files), 2)
        first, second = replicas

        # A burst: every connect answered, and both replicas took part (queue group).
        burst = [seed for seed, _ in users[:30]]
        conns += await connect_all(server.url, burst)
        await all_answered(wire, len(burst))
        await eventually(lambda: len(decided(first)) + len(decided(second)) == len(burst))
        assert sorted(decided(first) + decided(second)) == sorted(p for _, p in users[:30])
        assert decided(first) and decided(second)

        # Kill one replica; once the server has dropped its connection, the other one
        # answers everything.
        handled_by_second = len(decided(second))
        second.kill()
        # (Its store connection, "callout-store", and its users-cache watch's,
        # "callout-users-watch", go too.)
        await next_event(
            disconnects,
            lambda e: e["client"].get("acc") == "AUTH" and e["client"].get("name") == "callout",
        )

        after = [seed for seed, _ in users[30:]]
        conns += await connect_all(server.url, after)
        await all_answered(wire, len(burst) + len(after))
        await eventually(lambda: len(decided(first)) + handled_by_second == len(users))
        assert sorted(decided(first)[-len(after) :]) == sorted(p for _, p in users[30:])

        # Exactly one reply per request, and no reply to anything else.
        for conn in conns:
            assert await conn.ping() is None and not conn.closed
        assert len(wire.inboxes) == len(users)
        assert set(wire.replies) == set(wire.inboxes)
        assert set(wire.replies.values()) == {1}
        assert len(decided(first)) + len(decided(second)) == len(users)
    finally:
        for conn in conns:
            await conn.close()
        for replica in replicas:
            replica.kill()
        await sys_nc.close()
        await admin.close()


SEED_TEXT = re.compile(r"S[AUXNOC][A-Z2-7]{56}")
LONG_BASE64 = re.compile(r"[A-Za-z0-9+/_-]{80,}")


async def test_every_connect_logs_one_decision_line_without_secrets(
    nats_server: ServerFactory, keys: Keys, tmp_path: Path
) -> None:
    server = nats_server(xkey=True)
    files = seed_files(keys, tmp_path / "keys")
    known_seed, known = new_user()
    revoked_seed, revoked = new_user()
    internal_seed, internal = new_user()
    stranger_seed, stranger = new_user()
    async with deployment(server, keys, start=False) as dep:
        await dep.put(known, record("k", pub_allow=["$SYS.REQ.USER.INFO"], sub_allow=["_INBOX.>"]))
        await dep.put(revoked, record("r", revoked=True))
        (svc,) = await start_replicas(
            serve_args(server, files, "--internal-key", internal, xkey=True), 1
        )
        try:
            sigs: list[str] = []
            expected: list[tuple[str, str, str]] = []

            async def raw(seed: str, client: str, decision: str, reason: str, **kw: Any) -> None:
                result = await raw_connect(server.url, seed, **kw)
                assert result.admitted is (decision == "admit"), result.error
                if result.connect.get("sig"):
                    sigs.append(result.connect["sig"])
                expected.append((client, decision, reason))
                await eventually(lambda: len(svc.events("decision")) == len(expected))

            await raw(known_seed, known, "admit", "admit")
            await raw(known_seed, known, "admit", "admit", sig_encoding="std")
            await raw(internal_seed, internal, "admit", "internal")
            await raw(stranger_seed, stranger, "deny", "unknown_user")
            await raw(revoked_seed, revoked, "deny", "revoked")
            await raw(stranger_seed, known, "deny", "bad_signature", nkey=known)
            await raw(known_seed, known, "deny", "no_signature", sig="omit")

            nc = await nats_connect(server.url, known_seed)  # nats-py, padded std sig
            try:
                assert (await user_info(nc))["user"] == "k"
            finally:
                await nc.close()
            expected.append((known, "admit", "admit"))
            await eventually(lambda: len(svc.events("decision")) == len(expected))

            lines = svc.events("decision")
            assert [(d["client"], d["decision"], d["reason"]) for d in lines] == expected
            for line in lines:
                assert isinstance(line["latency_ms"], int | float) and line["latency_ms"] >= 0
            assert svc.terminate() == 0
            svc.wait_for("stopped")
        finally:
            svc.kill()

    stderr = "\n".join(svc.raw)
    assert "eyJ" not in stderr  # no JWT (requests, responses, user JWTs)
    assert "xkv1" not in stderr
    assert SEED_TEXT.search(stderr) is None
    for secret in (
        keys.service_seed,
        keys.issuer_seed,
        keys.xkey_seed,
        known_seed,
        revoked_seed,
        internal_seed,
        stranger_seed,
    ):
        assert secret not in stderr
    for sig in sigs:
        assert sig not in stderr
        assert sig.rstrip("=") not in stderr
    assert LONG_BASE64.search(stderr) is None
    # The scan itself would see them: the patterns match the real thing.
    assert len(sigs) >= 6 and all(LONG_BASE64.fullmatch(sig.rstrip("=")) for sig in sigs)
    assert SEED_TEXT.fullmatch(keys.issuer_seed) and SEED_TEXT.fullmatch(keys.xkey_seed)
