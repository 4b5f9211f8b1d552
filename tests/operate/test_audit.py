"""The audit trail against a real JetStream: one message per decision with the fields the issue
lists, de-duplicated by request id, on a stream created with bounded retention; and when the
stream is gone, full of nothing or silent, decisions go on and every message is accounted for
as lost (issue: "Audit trail"). How much a broken stream costs a decision is measured by
`bench/audit_overhead.py`, not asserted here.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats.js.errors
import orjson
from nats.aio.msg import Msg

from callout.audit import Audit, AuditConfig
from callout.decision import Decision
from callout.metrics import AUDIT_LOSS_CAUSES, Metrics
from tests.support.nats import Keys, NatsServer, ServerFactory, nats_connect, new_user, raw_connect
from tests.support.operate import Operated, captured_logs, operated, ops_args, value
from tests.support.service import record, users_bucket
from tests.support.wait import eventually


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    return value(metrics.render().decode(), name, **labels) or 0.0


def lost(metrics: Metrics) -> float:
    return sum(metric(metrics, "callout_audit_lost_total", cause=c) for c in AUDIT_LOSS_CAUSES)


@asynccontextmanager
async def audited(
    server: NatsServer, keys: Keys, pub: str, **args: Any
) -> AsyncIterator[tuple[Operated, list[Decision]]]:
    admin = await nats_connect(server.url, keys.service_seed)
    try:
        await (await users_bucket(admin)).put(pub, record("alice", pub_allow=["orders.>"]))
    finally:
        await admin.close()
    async with operated(server, keys, args=ops_args(metrics_addr=None, **args)) as op:
        decisions: list[Decision] = []
        op.svc.service.observers.append(lambda decision, _latency: decisions.append(decision))
        yield op, decisions


async def stream_messages(op: Operated, stream: str) -> int:
    info = await op.svc.nc.jetstream().stream_info(stream)
    return info.state.messages


async def silent_audit(op: Operated, metrics: Metrics, stream: str, **config: Any) -> Audit:
    """An `Audit` whose publishes are never acknowledged (a JetStream that hangs): no stream
    takes its subjects, and a subscriber that never answers gives them interest, so there is
    no "no responders" either."""
    nc = op.svc.nc
    prefix = stream.lower()

    async def black_hole(msg: Msg) -> None:
        pass

    await nc.subscribe(f"{prefix}.>", cb=black_hole)
    await nc.flush()
    audit = Audit(
        nc,
        AuditConfig(stream, max_age=60, max_bytes=1 << 20, subject_prefix=prefix, **config),
        metrics,
    )
    await audit.start()
    assert await nc.jetstream().delete_stream(stream)  # created by start(): remove it
    return audit


async def test_messages_land_in_the_stream_deduplicated(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    stranger_seed, stranger = new_user()
    async with audited(
        server, keys, pub, audit_stream="AUDIT", audit_max_age=3600.0, audit_max_bytes=1 << 24
    ) as (op, decisions):
        js = op.svc.nc.jetstream()
        config = (await js.stream_info("AUDIT")).config
        assert config.subjects == ["callout.audit.>"]
        assert (config.max_age, config.max_bytes) == (3600.0, 1 << 24)
        assert config.duplicate_window == 120.0

        admitted = await raw_connect(server.url, seed)
        assert admitted.admitted
        assert not (await raw_connect(server.url, stranger_seed)).admitted

        async def both_stored() -> bool:
            return await stream_messages(op, "AUDIT") == 2

        await eventually(both_stored)
        messages = [await js.get_msg("AUDIT", seq) for seq in (1, 2)]
        docs = {
            orjson.loads(m.data or b"")["decision"]: (m, orjson.loads(m.data or b""))
            for m in messages
        }
        server_id = admitted.info["server_id"]

        admit_msg, admit = docs["admit"]
        assert admit_msg.subject == "callout.audit.admit"
        assert admit["server"] == server_id and admit["client"] == pub
        assert admit["client_ip"] == "127.0.0.1" and isinstance(admit["client_id"], int)
        assert (admit["reason"], admit["account"], admit["name"]) == ("admit", "APP", "alice")
        expected_hash = hashlib.sha256(b'{"pub":{"allow":["orders.>"]}}').hexdigest()
        assert admit["permissions_hash"] == expected_hash
        assert admit["latency_ms"] > 0 and admit["time"].endswith("Z")
        assert admit["request_id"].startswith(f"{server_id}.U")
        assert (admit_msg.headers or {})["Nats-Msg-Id"] == admit["request_id"]

        deny_msg, deny = docs["deny"]
        assert deny_msg.subject == "callout.audit.deny"
        assert (deny["client"], deny["reason"]) == (stranger, "unknown_user")
        assert deny["account"] is None and deny["permissions_hash"] is None

        # The same decision published again (as a retry after a lost ack would) is dropped by
        # the stream: same Nats-Msg-Id.
        (admit_decision,) = [x for x in decisions if x.admit]
        assert op.ops.audit is not None
        op.ops.audit.observe(admit_decision, 0.001)

        async def duplicate_seen() -> bool:
            return metric(op.ops.metrics, "callout_audit_duplicates_total") == 1

        await eventually(duplicate_seen)
        assert await stream_messages(op, "AUDIT") == 2
        assert metric(op.ops.metrics, "callout_audit_published_total") == 2
        assert lost(op.ops.metrics) == 0


async def test_a_missing_stream_loses_messages_not_decisions(
    server: NatsServer, keys: Keys
) -> None:
    seed, pub = new_user()
    async with audited(server, keys, pub, audit_stream="AUDIT") as (op, _):
        js = op.svc.nc.jetstream()
        # Someone replaced the stream with one that does not take our subjects: publishes have
        # nowhere to go, and we do not rewrite an operator's stream.
        assert await js.delete_stream("AUDIT")
        await js.add_stream(name="AUDIT", subjects=["elsewhere.>"])
        with captured_logs() as logs:
            for _ in range(5):
                assert (await raw_connect(server.url, seed)).admitted

            async def all_lost() -> bool:
                return metric(op.ops.metrics, "callout_audit_lost_total", cause="no_stream") == 5

            await eventually(all_lost)
        assert metric(op.ops.metrics, "callout_audit_published_total") == 0
        # One warning for the outage, not one per message.
        assert [f["cause"] for _, f in logs.named("audit_lost")] == ["no_stream"]


async def test_a_silent_stream_loses_messages_not_decisions(
    nats_server: ServerFactory, keys: Keys
) -> None:
    """Publishes that are never acknowledged (a JetStream that hangs): the ack deadline, the cap
    on outstanding publishes and the bounded buffer each shed messages; every decision is
    still made, and every message is counted once, stored or lost."""
    server = nats_server()
    seed, pub = new_user()
    async with audited(server, keys, pub) as (op, _):
        audit = await silent_audit(
            op, op.ops.metrics, "HOLE", buffer=3, max_pending=2, ack_timeout=0.2
        )
        op.svc.service.observers.append(audit.observe)
        try:
            n = 12
            for _ in range(n):
                assert (await raw_connect(server.url, seed)).admitted

            async def accounted() -> bool:
                return lost(op.ops.metrics) == n

            await eventually(accounted)
            metrics = op.ops.metrics
            assert metric(metrics, "callout_audit_published_total") == 0
            assert metric(metrics, "callout_audit_lost_total", cause="timeout") > 0
            assert metric(metrics, "callout_audit_lost_total", cause="buffer_full") > 0
        finally:
            op.svc.service.observers.remove(audit.observe)
            await audit.stop()


async def test_a_deleted_stream_is_recreated(server: NatsServer, keys: Keys) -> None:
    seed, pub = new_user()
    async with audited(server, keys, pub) as (op, _):
        nc = op.svc.nc
        config = AuditConfig(
            stream="AGAIN",
            max_age=600,
            max_bytes=1 << 20,
            ensure_interval=0,
            subject_prefix="again",
        )
        audit = Audit(nc, config, op.ops.metrics)
        with captured_logs() as logs:
            await audit.start()
            op.svc.service.observers.append(audit.observe)
            try:
                assert await nc.jetstream().delete_stream("AGAIN")
                assert (await raw_connect(server.url, seed)).admitted  # lost: no stream

                async def recreated() -> bool:
                    try:
                        return await stream_messages(op, "AGAIN") == 0
                    except nats.js.errors.NotFoundError:
                        return False

                await eventually(recreated)
                assert (await raw_connect(server.url, seed)).admitted

                async def stored() -> bool:
                    return await stream_messages(op, "AGAIN") == 1

                await eventually(stored)
            finally:
                op.svc.service.observers.remove(audit.observe)
                await audit.stop()
        assert len(logs.named("audit_stream_created")) == 2
        assert metric(op.ops.metrics, "callout_audit_lost_total", cause="no_stream") == 1
        assert [f["cause"] for _, f in logs.named("audit_lost")] == ["no_stream"]
        assert len(logs.named("audit_recovered")) == 1


async def test_messages_left_at_stop_are_counted_once(server: NatsServer, keys: Keys) -> None:
    _, pub = new_user()
    async with audited(server, keys, pub) as (op, _):
        metrics = Metrics()
        audit = await silent_audit(op, metrics, "GONE", ack_timeout=0.3, stop_timeout=0.05)
        for _ in range(3):
            audit.observe(Decision("unknown_user", "x"), 0.001)
        await audit.stop()
        assert metric(metrics, "callout_audit_lost_total", cause="shutdown") == 3
        # The acks that were still awaited time out after stop: neither retried nor counted a
        # second time.
        await asyncio.sleep(audit.config.ack_timeout * 2)  # the deadline is a timer, not an event
        assert lost(metrics) == 3
        assert audit.buffered == 0
