"""End-to-end admission against a real nats-server: a deployment (server, a connection as the
service identity that reads the users bucket and the AUTH.ERR events, an in-process service),
and the checks on what a client sees: `user_info`, `denied`/`expect_denied` (the exact reason of
the server's auth-error event, docs/protocol.md §3), `jwt_claims`, `perms`/`granted`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client

from tests.support.nats import (
    SERVICE_ERROR,
    Keys,
    NatsServer,
    RawResult,
    auth_errors,
    nats_connect,
    next_event,
    raw_connect,
)
from tests.support.service import InProcess, start_in_process, users_bucket

USER_INFO = "$SYS.REQ.USER.INFO"


AUTH_VIOLATION = "Authorization Violation"


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
@dataclass
class Deployment:
    """A started server, an AUTH-account connection (the service identity, which may read the
    users bucket and the AUTH.ERR events) and, usually, an in-process service."""

    server: NatsServer
    admin: Client
    events: asyncio.Queue[dict[str, Any]]
    svc: InProcess | None = None

    async def put(self, pub: str, value: bytes) -> None:
        kv = await users_bucket(self.admin)
        await kv.put(pub, value)

    async def reason(self, user: str, timeout: float = 5.0) -> str:
        """The reason of the next auth-error event for this client (`client.user`: the nkey,
        the username, or `[REDACTED]` for a token)."""
        event = await next_event(
            self.events, lambda e: e.get("client", {}).get("user") == user, timeout=timeout
        )
        reason: str = event["reason"]
        return reason


@contextlib.asynccontextmanager
async def deployment(
    server: NatsServer, keys: Keys, *, start: bool = True, **policy: Any
) -> AsyncIterator[Deployment]:
    admin = await nats_connect(server.url, keys.service_seed)
    dep = Deployment(server, admin, await auth_errors(admin))
    try:
        if start:
            dep.svc = await start_in_process(server, keys, **policy)
        yield dep
    finally:
        if dep.svc is not None:
            await dep.svc.stop()
        await admin.close()


async def user_info(nc: Client) -> dict[str, Any]:
    """`$SYS.REQ.USER.INFO` as the connected user sees itself: account, name, permissions."""
    msg = await nc.request(USER_INFO, b"", timeout=2)
    data: dict[str, Any] = orjson.loads(msg.data)["data"]
    return data


async def info_as(url: str, seed: str, **options: Any) -> dict[str, Any]:
    """Connect as `seed` (nats-py, which fails on a deny), read `user_info`, disconnect."""
    nc = await nats_connect(url, seed, **options)
    try:
        return await user_info(nc)
    finally:
        await nc.close()


async def denied(
    dep: Deployment, seed: str | None, *, user: str | None = None, **raw: Any
) -> tuple[RawResult, str]:
    """Connect by hand; assert the client got `Authorization Violation`; return the result and
    the reason of the server's auth-error event for it."""
    result = await raw_connect(dep.server.url, seed, **raw)
    assert not result.admitted
    assert result.error == AUTH_VIOLATION
    who = user if user is not None else result.connect.get("nkey")
    assert isinstance(who, str)
    return result, await dep.reason(who)


async def expect_denied(
    dep: Deployment, seed: str | None, reason: str, *, user: str | None = None, **raw: Any
) -> RawResult:
    """Denied, and the server's event carries exactly our reason text (a server-side timeout
    would carry an empty reason, §3 table: so this also proves an explicit error response)."""
    result, got = await denied(dep, seed, user=user, **raw)
    assert got == SERVICE_ERROR + reason
    return result


def jwt_claims(token: bytes | str) -> dict[str, Any]:
    """The claims of a compact JWT, unverified: only to look at what went over the wire."""
    raw = token.encode() if isinstance(token, str) else token
    payload = raw.split(b".")[1]
    claims: dict[str, Any] = orjson.loads(
        base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))
    )
    return claims


def perms(
    pub_allow: list[str], pub_deny: list[str], sub_allow: list[str], sub_deny: list[str]
) -> dict[str, Any]:
    """The `permissions` object of USER.INFO for these lists, in `granted` form."""
    return granted(
        {
            "permissions": {
                "publish": {"allow": pub_allow, "deny": pub_deny},
                "subscribe": {"allow": sub_allow, "deny": sub_deny},
            }
        }
    )


def granted(info: dict[str, Any]) -> dict[str, Any]:
    """USER.INFO's `permissions`, normalised: the server lists subjects in no fixed order and
    omits empty lists (and the whole object for an unrestricted user)."""
    out: dict[str, Any] = {}
    for kind, rules in (info.get("permissions") or {}).items():
        lists = {k: sorted(v) for k, v in rules.items() if v}
        if lists:
            out[kind] = lists
    return out
