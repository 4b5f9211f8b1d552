"""Every hostile case over the wire: a real nats-server, the service in-process (its queue
subscription, its task per request, its KV store), and the case's exact payload and headers
published on `$SYS.REQ.USER.AUTH` by request/reply.

For every case: the reply arrives (never silence) and is the empty body or a signed error
whose `nats.error` is the expected reason; the service's own decision (seen by an observer,
so the reason is known for empty bodies too) is that reason and not an admit; expired
requests get no reply and count in `stats.dropped`; and the service then admits a real
client, so no hostile input broke it.

How the payload gets there: nats-server denies every user of the callout account publishing
on `$SYS.REQ.USER.AUTH` (it adds the deny itself; docs/protocol.md §3 check 16), so no AUTH
user, not even the service's identity, can inject a request. The injector is a user of a separate
account HOSTILE that imports the subject as a service from AUTH: the message reaches the
service's queue subscription on `$SYS.REQ.USER.AUTH` with the case's headers (plus the
server's `Nats-Request-Info`, which the core ignores) and a reply subject routed back.

The case's signatures pin its `exp`, so the service's clock is pinned to the case's `now`
while it handles the case (the same clock the core test uses), and set back to the real
clock before the real client connects.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.msg import Msg

from callout.decision import ADMIT, Decision
from tests.support.hostile import (
    HOSTILE,
    Case,
    auth_account_body,
    check_answer,
    hostile_account_body,
    load_all,
)
from tests.support.nats import AUTH_SUBJECT, Keys, NatsServer, nats_connect, new_user
from tests.support.service import record, start_in_process, users_bucket

CASES = load_all()
REPLY_TIMEOUT = 5.0


@dataclass
class Deployment:
    server: NatsServer
    keys: Keys
    injector_seed: str
    client_seed: str  # a real client with a record: admitted after every case


def users_of(cases: list[Case]) -> dict[str, str]:
    """Every record the cases need; two cases naming one key must agree on its record."""
    users: dict[str, str] = {}
    for case in cases:
        for key, value in case.users.items():
            if value is None:
                continue
            assert users.setdefault(key, value) == value, f"{case.name}: {key} has two records"
    return users


async def fill_bucket(server: NatsServer, keys: Keys, users: dict[str, bytes]) -> None:
    nc = await nats_connect(server.url, keys.service_seed)
    try:
        kv = await users_bucket(nc)
        for key, value in users.items():
            await kv.put(key, value)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def deployments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, Deployment]]:
    """One nats-server per xkey setting, shared by the module's cases: each case starts its
    own service, so no state but the users bucket carries over."""
    keys = {c.deployment_keys for c in CASES}
    assert len(keys) == 1, "the corpus uses one set of test keys"
    (corpus_keys,) = keys
    started: dict[bool, Deployment] = {}
    try:
        for xkey in (False, True):
            injector_seed, injector_pub = new_user()
            client_seed, client_pub = new_user()
            workdir = Path(tmp_path_factory.mktemp(f"hostile-wire-{'xkey' if xkey else 'plain'}"))
            server = NatsServer.from_keys(
                workdir,
                corpus_keys,
                xkey=xkey,
                extra_auth_users=[injector_pub],
                extra_accounts={
                    "AUTH": auth_account_body(corpus_keys),
                    HOSTILE: hostile_account_body(injector_pub),
                },
            ).start()
            started[xkey] = Deployment(server, corpus_keys, injector_seed, client_seed)
            users = {
                k: v.encode() for k, v in users_of([c for c in CASES if c.xkey is xkey]).items()
            }
            users[client_pub] = record("real-client")
            asyncio.run(fill_bucket(server, corpus_keys, users))
        yield started
    finally:
        for dep in started.values():
            dep.server.stop()


@pytest.mark.parametrize("case", [c.param() for c in CASES])
async def test_case_over_the_wire(case: Case, deployments: dict[bool, Deployment]) -> None:
    dep = deployments[case.xkey]
    svc = await start_in_process(dep.server, dep.keys, xkey=case.xkey)
    service = svc.service
    decisions: asyncio.Queue[Decision] = asyncio.Queue()
    service.observers.append(lambda decision, _latency: decisions.put_nowait(decision))
    service.clock = lambda: case.now
    injector = await nats_connect(dep.server.url, dep.injector_seed)
    try:
        inbox = injector.new_inbox()
        replies: asyncio.Queue[Msg] = asyncio.Queue()

        async def on_reply(msg: Msg) -> None:
            replies.put_nowait(msg)

        await injector.subscribe(inbox, cb=on_reply)
        await injector.publish(AUTH_SUBJECT, case.payload, reply=inbox, headers=case.headers)
        await injector.flush()

        decision = await asyncio.wait_for(decisions.get(), REPLY_TIMEOUT)
        assert not decision.admit, f"ADMITTED over the wire: {decision.reason}"
        assert decision.reason == case.reason, decision.detail
        if case.answer == "drop":
            assert service.stats.dropped == 1
            # Anything the service had sent would be ahead of these two round trips.
            await svc.nc.flush()
            await injector.flush()
            assert replies.empty(), "an expired request was answered"
            body = None
        else:
            body = (await asyncio.wait_for(replies.get(), REPLY_TIMEOUT)).data
            assert service.stats.dropped == 0
        check_answer(case, None, body)
        assert service.stats.errors == 0

        # The service is intact: a real client connecting now is admitted.
        service.clock = time.time
        client = await nats_connect(dep.server.url, dep.client_seed)
        await client.close()
        admitted = await asyncio.wait_for(decisions.get(), REPLY_TIMEOUT)
        assert admitted.reason == ADMIT, admitted.detail
        assert replies.empty(), "a second answer to the hostile request"
    finally:
        await injector.close()
        await svc.stop()
