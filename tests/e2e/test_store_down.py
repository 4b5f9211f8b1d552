"""Fail closed, and stay reachable for internal identities, when the users store is gone: the
bucket deleted, JetStream not there at all, or the bucket not created yet (issue: "Internal
identity by key"; "Fail closed"). A normal user is denied at once with `store_unavailable`
(never left to the server's timeout); an `--internal-key` is admitted without the store.
"""

from __future__ import annotations

from tests.support.admission import AUTH_VIOLATION, Deployment, deployment, expect_denied, info_as
from tests.support.nats import Keys, NatsServer, ServerFactory, new_user, raw_connect
from tests.support.service import APP, record, users_bucket

#: The fast-deny bound the issue asks for while the store is down.
FAST_DENY = 0.5


async def _internal_admitted(dep: Deployment, seed: str) -> None:
    info = await info_as(dep.server.url, seed)
    assert info["account"] == APP
    assert "permissions" not in info  # internal identities are unrestricted by default


async def _denied_fast(dep: Deployment, seed: str) -> None:
    result = await expect_denied(dep, seed, "store_unavailable")
    assert result.elapsed < FAST_DENY, result.elapsed


async def test_internal_key_admitted_while_bucket_deleted(server: NatsServer, keys: Keys) -> None:
    internal_seed, internal = new_user()
    user_seed, user = new_user()
    async with deployment(server, keys, internal_keys=(internal,)) as dep:
        await dep.put(user, record("normal", admin=True))
        assert (await raw_connect(server.url, user_seed)).admitted  # control: store works

        assert await dep.admin.jetstream().delete_key_value("users")
        await _denied_fast(dep, user_seed)
        await _internal_admitted(dep, internal_seed)
        # Still denied after an internal admit: the store was never consulted for it.
        await _denied_fast(dep, user_seed)


async def test_internal_key_admitted_while_jetstream_unreachable(
    nats_server: ServerFactory, keys: Keys
) -> None:
    server = nats_server(jetstream=False)
    internal_seed, internal = new_user()
    user_seed, _ = new_user()
    async with deployment(server, keys, internal_keys=(internal,)) as dep:
        await _internal_admitted(dep, internal_seed)
        await _denied_fast(dep, user_seed)
        # An internal key still proves its key: a forged CONNECT for it is no way in.
        await expect_denied(dep, user_seed, "bad_signature", nkey=internal)


async def test_service_started_before_bucket_picks_it_up(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    async with deployment(server, keys) as dep:
        assert dep.svc is not None
        service = dep.svc.service
        await _denied_fast(dep, seed)

        # Create the bucket and the record from outside; the running service is not touched.
        kv = await users_bucket(dep.admin)
        await kv.put(pub, record("late", pub_allow=["$SYS.REQ.USER.INFO"], sub_allow=["_INBOX.>"]))
        info = await info_as(server.url, seed)
        assert info["account"] == APP and info["user"] == "late"
        assert dep.svc.service is service  # same service object: no restart

        # And a user without a record is now told apart from a missing store.
        stranger, _ = new_user()
        denied = await expect_denied(dep, stranger, "unknown_user")
        assert denied.error == AUTH_VIOLATION
