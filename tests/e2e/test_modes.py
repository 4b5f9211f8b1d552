"""Soft mode (`--mode soft`) and the user JWT lifetime (`--user-ttl`), against a real
nats-server.

Soft mode admits only what enforce mode would deny for lack of a record; everything that is
a proof failure or a store failure is still denied (issue, point 7). `--user-ttl` becomes the
user JWT's `exp`, which the server enforces by closing the connection (docs/protocol.md §3, "On
expiry").
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.aio.msg import Msg

from callout.records import Permissions, Rules
from tests.support.admission import (
    USER_INFO,
    deployment,
    expect_denied,
    granted,
    info_as,
    jwt_claims,
    perms,
    user_info,
)
from tests.support.nats import Keys, NatsServer, ServerFactory, nats_connect, new_user
from tests.support.operate import captured_logs
from tests.support.service import APP, record

SOFT_DEFAULTS = Permissions(
    pub=Rules(allow=(USER_INFO, "soft.>"), deny=("soft.secret",)),
    sub=Rules(allow=("_INBOX.>",)),
)


def decisions() -> Any:
    """The service's log, from which the tests read its `decision` lines."""
    return captured_logs()


def decided(log: Any) -> list[dict[str, Any]]:
    """The structured fields of each `decision` line the service logged."""
    return [fields for _, fields in log.named("decision")]


async def test_soft_mode_admits_unknown_with_defaults_and_denies_the_rest(
    server: NatsServer, keys: Keys
) -> None:
    unknown_seed, unknown = new_user()
    known_seed, known = new_user()
    revoked_seed, revoked = new_user()
    policy: dict[str, Any] = {"mode": "soft", "default_permissions": SOFT_DEFAULTS}
    with decisions() as log:
        async with deployment(server, keys, **policy) as dep:
            await dep.put(known, record("kim", pub_allow=[USER_INFO], sub_allow=["_INBOX.>"]))
            await dep.put(revoked, record("rev", revoked=True, admin=True))

            # Unknown, valid signature: admitted with the default permissions.
            info = await info_as(server.url, unknown_seed)
            assert info["account"] == APP
            assert granted(info) == perms([USER_INFO, "soft.>"], ["soft.secret"], ["_INBOX.>"], [])
            assert [d["reason"] for d in decided(log) if d["client"] == unknown] == ["would_deny"]

            # A known user still gets its own record, not the defaults.
            info = await info_as(server.url, known_seed)
            assert info["user"] == "kim"
            assert granted(info) == perms([USER_INFO], [], ["_INBOX.>"], [])

            # Unknown key with somebody else's signature; revoked: denied as in enforce mode.
            await expect_denied(dep, known_seed, "bad_signature", nkey=unknown)
            await expect_denied(dep, None, "no_signature", nkey=unknown, sig="omit")
            await expect_denied(dep, revoked_seed, "revoked")

            # Store down: "no answer" is not "no record", so soft mode admits no one.
            assert await dep.admin.jetstream().delete_key_value("users")
            await expect_denied(dep, unknown_seed, "store_unavailable")
            await expect_denied(dep, known_seed, "store_unavailable")


async def test_soft_mode_denies_a_deleted_record(nats_server: ServerFactory, keys: Keys) -> None:
    """A restricted user whose record is deleted was admitted `would_deny` with the default
    permissions (unrestricted by default): deleting a user widened its access."""
    server = nats_server()
    seed, pub = new_user()
    async with deployment(server, keys, mode="soft") as dep:
        await dep.put(pub, record("narrow", pub_allow=[USER_INFO], sub_allow=["_INBOX.>"]))
        nc = await nats_connect(server.url, seed)
        try:
            assert (await user_info(nc))["user"] == "narrow"
        finally:
            await nc.close()
        kv = await dep.admin.jetstream().key_value("users")
        await kv.delete(pub)
        await expect_denied(dep, seed, "unknown_user")
        await kv.put(pub, record("narrow", pub_allow=[USER_INFO]))
        await kv.purge(pub)
        await expect_denied(dep, seed, "unknown_user")
        # A key that never had a record is still admitted with the defaults.
        stranger_seed, _ = new_user()
        nc = await nats_connect(server.url, stranger_seed)
        await nc.close()


async def test_user_ttl_expiry_closes_the_connection(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    async with deployment(server, keys, user_ttl=2.0) as dep:
        await dep.put(pub, record("brief", admin=True))
        responses: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_reply(msg: Msg) -> None:
            responses.put_nowait(msg.data)

        await dep.admin.subscribe("$SYS._INBOX.>", cb=on_reply)
        await dep.admin.flush()
        closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def on_closed() -> None:
            if not closed.done():
                closed.set_result(None)

        nc = await nats_connect(server.url, seed, allow_reconnect=False, closed_cb=on_closed)
        try:
            assert (await user_info(nc))["user"] == "brief"
            await asyncio.wait_for(closed, 15)
            assert nc.is_closed
            assert "user authentication expired" in str(nc.last_error).lower()
        finally:
            await nc.close()
        # The user JWT's exp came from --user-ttl: now + 2 s +-10 %, in whole seconds (§4).
        user = jwt_claims(jwt_claims(await asyncio.wait_for(responses.get(), 5))["nats"]["jwt"])
        assert 1 <= user["exp"] - user["iat"] <= 3


async def test_user_ttl_zero_issues_no_expiry(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    async with deployment(server, keys, user_ttl=0.0) as dep:
        await dep.put(pub, record("forever", admin=True))
        info = await info_as(server.url, seed)
        assert "expires" not in info
