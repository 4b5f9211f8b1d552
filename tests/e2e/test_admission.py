"""Admission by record, against a real nats-server with JetStream: a known user gets exactly
its record's permissions in the right account; unknown, revoked, malformed-record users and
records naming a forbidden account are denied, each with the service's reason visible in the
server's `$SYS.ACCOUNT.CLIENT.AUTH.ERR` event (docs/protocol.md §3, "What the client sees on deny").

The helpers at the top (`deployment`, `user_info`, `denied`/`expect_denied`, `jwt_claims`,
`perms`/`granted`) are shared by the other end-to-end modules of this directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from callout.decision import PolicyError
from tests.support.admission import USER_INFO, deployment, expect_denied, granted, info_as, perms
from tests.support.nats import Keys, NatsServer, ServerFactory, new_user, raw_connect
from tests.support.service import APP, policy_for, record, run_cli


# ---------------------------------------------------------------------------------------------
# admitted
# ---------------------------------------------------------------------------------------------
async def test_known_user_gets_exactly_its_permissions(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    pub_allow, pub_deny = ["orders.>", USER_INFO], ["orders.secret"]
    sub_allow, sub_deny = ["_INBOX.>", "orders.*"], ["orders.audit"]
    async with deployment(server, keys) as dep:
        await dep.put(
            pub,
            record(
                "alice",
                pub_allow=pub_allow,
                pub_deny=pub_deny,
                sub_allow=sub_allow,
                sub_deny=sub_deny,
            ),
        )
        info = await info_as(server.url, seed)
        assert info["account"] == APP
        assert info["user"] == "alice"  # the record's name becomes the user name (§3 check 16)
        assert granted(info) == perms(pub_allow, pub_deny, sub_allow, sub_deny)

        result = await raw_connect(server.url, seed, keep_open=True)
        assert result.admitted, result.error
        assert result.conn is not None
        async with result.conn as conn:
            assert await conn.publish("orders.new", b"x") is None
            assert await conn.publish("orders.secret", b"x") == (
                'Permissions Violation for Publish to "orders.secret"'
            )
            assert await conn.publish("payments.new", b"x") == (
                'Permissions Violation for Publish to "payments.new"'
            )
            _, err = await conn.subscribe("orders.new")
            assert err is None
            _, err = await conn.subscribe("orders.audit")
            assert err is not None and err.startswith("Permissions Violation for Subscription")
            # A permissions violation is not fatal: the connection is still up.
            assert await conn.ping() is None


async def test_admin_record_has_no_restrictions(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    async with deployment(server, keys) as dep:
        # admin wins over whatever lists the record also carries.
        await dep.put(pub, record("root", admin=True, pub_allow=["only.this"]))
        info = await info_as(server.url, seed)
        assert info["account"] == APP
        assert info["user"] == "root"
        assert "permissions" not in info
        assert granted(info) == {}

        result = await raw_connect(server.url, seed, keep_open=True)
        assert result.admitted and result.conn is not None
        async with result.conn as conn:
            assert await conn.publish("anything.at.all", b"x") is None
            assert await conn.subscribe(">") == ("1", None)


async def test_record_account_places_user_in_that_allowed_account(
    nats_server: ServerFactory, keys: Keys
) -> None:
    server = nats_server(extra_accounts=["OTHER"])
    seed, pub = new_user()
    async with deployment(server, keys, allowed_accounts=frozenset({APP, "OTHER"})) as dep:
        await dep.put(pub, record("olga", account="OTHER", pub_allow=[USER_INFO]))
        info = await info_as(server.url, seed)
        assert info["account"] == "OTHER"
        assert granted(info) == perms([USER_INFO], [], [], [])


# ---------------------------------------------------------------------------------------------
# denied
# ---------------------------------------------------------------------------------------------
async def test_unknown_and_revoked_users_denied(server: NatsServer, keys: Keys) -> None:
    stranger, _ = new_user()
    revoked_seed, revoked_pub = new_user()
    async with deployment(server, keys) as dep:
        await dep.put(revoked_pub, record("gone", revoked=True, admin=True))
        await expect_denied(dep, stranger, "unknown_user")
        await expect_denied(dep, revoked_seed, "revoked")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'["a", "list"]', id="not-an-object"),
        pytest.param(b'{"name": "x", "revoked": "no"}', id="revoked-is-a-string"),
        pytest.param(b'{"name": "x", "admin": 1}', id="admin-is-an-int"),
        pytest.param(b'{"name": 7}', id="name-is-an-int"),
        pytest.param(b'{"name": "x", "permissions": []}', id="permissions-not-object"),
        pytest.param(
            b'{"name": "x", "permissions": {"pub": {"allow": "a.b"}}}', id="allow-not-a-list"
        ),
        pytest.param(
            b'{"name": "x", "permissions": {"pub": {"allow": ["a..b"]}}}', id="bad-subject"
        ),
        pytest.param(
            b'{"name": "x", "permissions": {"sub": {"deny": ["a.>.b"]}}}', id="bad-wildcard"
        ),
        pytest.param(
            b'{"name": "x", "permissions": {"pub": {"allow": ["foo q1"]}}}', id="queue-in-pub"
        ),
        pytest.param(b'{"name": "x", "account": 5}', id="account-not-a-string"),
    ],
)
async def test_malformed_record_denied(server: NatsServer, keys: Keys, value: bytes) -> None:
    seed, pub = new_user()
    async with deployment(server, keys) as dep:
        await dep.put(pub, value)
        await expect_denied(dep, seed, "record_invalid")


async def test_misspelt_or_repeated_record_keys_deny_and_never_admit_unrestricted(
    nats_server: ServerFactory, keys: Keys
) -> None:
    """Each of these was admitted with no limits: the unknown key was ignored, so the lists
    came out empty (unrestricted), or the second of two `revoked` keys won."""
    server = nats_server()
    values = [
        b'{"name": "x", "permissions": {"publish": {"allow": ["a.>"]}}}',  # the server's spelling
        b'{"name": "x", "permissions": {"pub": {"Allow": ["a.>"]}}}',
        b'{"name": "x", "Revoked": true}',
        b'{"name": "x", "revoked": true, "revoked": false}',
    ]
    async with deployment(server, keys) as dep:
        for value in values:
            seed, pub = new_user()
            await dep.put(pub, value)
            await expect_denied(dep, seed, "record_invalid")


@pytest.mark.parametrize("account", ["SYS", "AUTH"])
async def test_record_naming_system_or_callout_account_denied_even_if_allowed(
    nats_server: ServerFactory, keys: Keys, account: str
) -> None:
    """In config mode the user JWT's `aud` alone decides placement (§5): the service is the
    only guard, and it holds even when the allowed list names the account."""
    server = nats_server()
    seed, pub = new_user()
    allowed = frozenset({APP, account})
    # No Policy allowing it can be built; the running service's is changed past that check, to
    # show the decision rules still deny it.
    with pytest.raises(PolicyError, match=f"refusing to place users in {account}"):
        policy_for(keys, allowed_accounts=allowed)
    async with deployment(server, keys) as dep:
        assert dep.svc is not None
        object.__setattr__(dep.svc.service.authorizer.policy, "allowed_accounts", allowed)
        await dep.put(pub, record("intruder", admin=True, account=account))
        await expect_denied(dep, seed, "account_not_allowed")


async def test_record_naming_an_unlisted_account_denied(
    nats_server: ServerFactory, keys: Keys
) -> None:
    server = nats_server(extra_accounts=["OTHER"])
    seed, pub = new_user()
    async with deployment(server, keys) as dep:  # allowed: APP only
        await dep.put(pub, record("olga", account="OTHER"))
        await expect_denied(dep, seed, "account_not_allowed")


@pytest.mark.parametrize("account", ["SYS", "AUTH"])
def test_serve_refuses_system_or_callout_account_as_allowed(
    files: dict[str, Path], keys: Keys, account: str
) -> None:
    done = run_cli(
        "serve",
        "--nats-url", "nats://127.0.0.1:1",
        "--nkey-seed-file", str(files["service"]),
        "--issuer-seed-file", str(files["issuer"]),
        "--account", APP,
        "--allowed-account", APP,
        "--allowed-account", account,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert account in lines[0]
    assert "Traceback" not in done.stderr
