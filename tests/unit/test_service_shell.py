"""callout.service, the asyncio shell, driven without NATS: a fake connection that records
publishes, `MemoryStore` (or a gated store) and a fixed clock. What it must promise:
exactly one reply per message (none for dead requests), a deny on every failure path,
no store lookup past its deadline, no more than `max_inflight` lookups at once, and an
answer inside the callback whenever no I/O is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import nkeys
import orjson
import pytest

from callout import decision as d
from callout import log
from callout.decision import Authorizer
from callout.store import StoreError
from callout.store.memory import MemoryStore
from tests.support import forge
from tests.support.forge import DELETE, ClientKey, Forged
from tests.support.nats import new_curve
from tests.support.operate import captured_logs
from tests.support.service import record
from tests.support.shell import (
    NOW,
    AdmitRespondRaises,
    DecideRaises,
    GatedStore,
    OpenRaises,
    RaisingStore,
    RespondRaises,
    make_env,
)


# ---------------------------------------------------------------------------------------------
# the happy path, for reference
# ---------------------------------------------------------------------------------------------
async def test_known_user_admitted_with_one_reply() -> None:
    env = make_env()
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    claims = env.reply_claims(env.only_reply(msg), forged)
    user = forge.decode_jwt(claims["nats"]["jwt"], nkeys.PREFIX_BYTE_ACCOUNT)
    assert user["sub"] == forged.user_nkey and user["name"] == "alice"
    assert user["nats"]["pub"] == {"allow": ["a.>"]}
    assert env.store.lookups == 1
    stats = env.service.stats
    assert (stats.replies, stats.admitted, stats.denied, stats.dropped) == (1, 1, 0, 0)


async def test_internal_key_is_never_looked_up() -> None:
    client = ClientKey.generate()
    env = make_env(internal_keys=(client.public,))
    env.client = client
    forged = env.forge()
    msg = env.msg(forged)
    env.store.error = "store is down"  # irrelevant for internal keys
    await env.handle(msg)
    claims = env.reply_claims(env.only_reply(msg), forged)
    assert "jwt" in claims["nats"]
    assert env.store.lookups == 0


async def test_unknown_user_is_denied_once() -> None:
    env = make_env(store=MemoryStore())
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    assert env.error_of(msg, forged) == d.UNKNOWN_USER
    assert env.service.stats.denied == 1


# ---------------------------------------------------------------------------------------------
# the store failing
# ---------------------------------------------------------------------------------------------
async def test_store_error_is_one_store_unavailable_reply() -> None:
    env = make_env()
    env.store.error = "JetStream is not available (no responders)"
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    assert env.error_of(msg, forged) == d.STORE_UNAVAILABLE
    assert env.store.lookups == 1
    assert env.service.stats.denied == 1 and env.service.stats.admitted == 0


async def test_slow_store_is_a_store_timeout_reply() -> None:
    env = make_env(backend_timeout=0.05)
    env.store.delay = 60.0  # far longer than the test is allowed to take (handle: 10 s bound)
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    assert env.error_of(msg, forged) == d.STORE_TIMEOUT
    assert env.store.lookups == 1


async def test_store_timeout_reply_goes_out_at_the_deadline_not_after_the_store() -> None:
    events: list[str] = []
    store = GatedStore(events)
    env = make_env(store, backend_timeout=0.05)
    env.events = events
    env.nc.events = events
    env.store.records[env.client.public] = record("alice")
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    # The store never answered: the lookup was abandoned at the deadline, then the deny sent.
    assert events == ["store_called", "store_cancelled", "publish"]
    assert not store.gate.is_set()
    assert env.error_of(msg, forged) == d.STORE_TIMEOUT


async def test_deadline_is_the_server_s_wait_when_that_comes_first() -> None:
    events: list[str] = []
    store = GatedStore(events)
    # Only the server's wait (exp - iat = 2 s, from our receive time) can end this lookup.
    env = make_env(store, backend_timeout=3600.0)
    env.nc.events = events
    forged = env.forge(timeout=2.0)
    msg = env.msg(forged)
    # Received, then 1.9 s pass before the lookup starts: the server gives up in 100 ms, and
    # the answer needs 50 ms to reach it.
    readings = iter([env.clock.now])
    env.service.clock = lambda: next(readings, env.clock.now + 1.9)
    await env.handle(msg)
    assert events == ["store_called", "store_cancelled", "publish"]
    assert env.error_of(msg, forged) == d.STORE_TIMEOUT


async def test_no_lookup_once_the_deadline_has_passed() -> None:
    events: list[str] = []
    store = GatedStore(events)
    env = make_env(store, backend_timeout=1.0, max_inflight=1)
    store.records[env.client.public] = record("alice")
    first, second = env.forge(timeout=10.0), env.forge(timeout=10.0)
    first_msg, second_msg = env.msg(first), env.msg(second)
    await env.service._on_message(first_msg)
    await env.service._on_message(second_msg)  # waits for the one task there is
    await asyncio.wait_for(store.when_active(1).wait(), 10)
    # The second waited 2 s for its turn: its 1 s budget is spent before its lookup.
    env.clock.now += 2.0
    store.gate.set()
    await asyncio.wait_for(env.service.stop(), 10)
    assert store.calls == 1
    bodies = dict(env.nc.published)
    assert "jwt" in env.reply_claims(bodies[first_msg.reply], first)["nats"]
    assert env.reply_claims(bodies[second_msg.reply], second)["nats"]["error"] == d.STORE_TIMEOUT


# ---------------------------------------------------------------------------------------------
# exceptions: one reply, internal_error, never an admit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nowait", [False, True], ids=["awaited", "nowait"])
@pytest.mark.parametrize(
    "exc", [RuntimeError("bug"), KeyError("k"), ValueError("v"), ZeroDivisionError()]
)
async def test_exception_in_the_store(exc: Exception, nowait: bool) -> None:
    env = make_env(RaisingStore(exc, nowait))
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    assert env.error_of(msg, forged) == d.INTERNAL_ERROR
    assert env.service.stats.admitted == 0 and env.service.stats.denied == 1


@pytest.mark.parametrize("nowait", [False, True], ids=["awaited", "nowait"])
async def test_store_error_subclass_is_unavailable_not_internal(nowait: bool) -> None:
    env = make_env(RaisingStore(StoreError("bucket 'users' does not exist"), nowait))
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    assert env.error_of(msg, forged) == d.STORE_UNAVAILABLE


@pytest.mark.parametrize(
    "authorizer", [DecideRaises, AdmitRespondRaises], ids=["in_decide", "while_admitting"]
)
async def test_exception_in_the_core_is_an_internal_error_deny(authorizer: type) -> None:
    """A bug deciding, or building the admitting user JWT, is denied `internal_error`: never an
    admit, never silence."""
    env = make_env(authorizer=authorizer)
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    assert env.error_of(msg, forged) == d.INTERNAL_ERROR
    assert env.service.stats.admitted == 0


@pytest.mark.parametrize("authorizer", [OpenRaises, RespondRaises])
async def test_exception_without_an_addressable_answer_is_an_empty_reply(
    authorizer: type[Authorizer],
) -> None:
    env = make_env(authorizer=authorizer)
    msg = env.msg(env.forge())
    await env.handle(msg)
    assert env.only_reply(msg) == b""  # the server's immediate deny (docs/protocol.md §3 check 1)
    assert env.service.stats.admitted == 0 and env.service.stats.denied == 1


async def test_publish_failure_is_counted_not_raised() -> None:
    env = make_env(fail_publish=True)
    msg = env.msg(env.forge())
    await env.handle(msg)
    assert env.events == ["publish"]
    assert env.service.stats.errors == 1 and env.service.stats.replies == 0


async def test_message_without_reply_subject_is_not_answered() -> None:
    env = make_env()
    msg = env.msg(env.forge(), reply="")
    await env.handle(msg)
    assert env.nc.published == [] and env.service.stats.replies == 0


# ---------------------------------------------------------------------------------------------
# dead requests
# ---------------------------------------------------------------------------------------------
async def test_expired_request_is_dropped_without_reply_or_lookup() -> None:
    env = make_env()
    forged = env.forge(now=NOW - 60)  # exp = NOW - 58: past any clock skew
    await env.service._on_message(env.msg(forged))
    await env.service.stop()
    assert env.nc.published == []
    stats = env.service.stats
    assert (stats.requests, stats.dropped, stats.replies, stats.denied) == (1, 1, 0, 0)
    assert env.store.lookups == 0


# ---------------------------------------------------------------------------------------------
# concurrency
# ---------------------------------------------------------------------------------------------
async def _spin(turns: int = 50) -> None:
    """Let every runnable task run (no time passes: sleep(0) only yields)."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_max_inflight_is_respected() -> None:
    events: list[str] = []
    store = GatedStore(events)
    env = make_env(store, max_inflight=2)
    env.nc.events = events
    forged = [env.forge() for _ in range(5)]
    store.records[env.client.public] = record("alice")
    msgs = [env.msg(f) for f in forged]

    for m in msgs:  # as nats-py does: one callback at a time; none of them waits
        await env.service._on_message(m)
    await asyncio.wait_for(store.when_active(2).wait(), 10)
    await _spin()
    assert store.active == 2 and store.calls == 2
    assert env.service.inflight == 2
    assert env.service.backlog == 3  # the others wait for a slot
    assert env.service.stats.requests == 5
    assert env.nc.published == []

    store.gate.set()
    await asyncio.wait_for(env.service.stop(), 10)
    assert store.max_active == 2 and store.calls == 5
    assert Counter(subject for subject, _ in env.nc.published) == Counter(m.reply for m in msgs)
    assert env.service.stats.admitted == 5 and env.service.inflight == 0
    assert env.service.backlog == 0


async def test_lookups_waiting_for_a_task_go_oldest_first() -> None:
    events: list[str] = []
    store = GatedStore(events)
    env = make_env(store, max_inflight=1)
    store.records[env.client.public] = record("alice")
    msgs = [env.msg(env.forge()) for _ in range(4)]
    await env.hold_then_drain(store, msgs, active=1)
    order = [subject for subject, _ in env.nc.published]
    # In arrival order: the oldest is the closest to the server's timeout, and none starves.
    assert order == [m.reply for m in msgs]


async def test_backlog_overflow_sheds_the_oldest_with_an_immediate_deny() -> None:
    events: list[str] = []
    store = GatedStore(events)
    env = make_env(store, max_inflight=1)
    env.service.max_backlog = 2
    store.records[env.client.public] = record("alice")
    msgs = [env.msg(env.forge()) for _ in range(5)]
    for m in msgs:
        await env.service._on_message(m)
    await asyncio.wait_for(store.when_active(1).wait(), 10)
    # msgs[0] runs; msgs[1] and msgs[2] were shed, oldest first, with an empty body.
    assert env.nc.published == [(msgs[1].reply, b""), (msgs[2].reply, b"")]
    assert env.service.stats.shed == 2 and env.service.backlog == 2
    store.gate.set()
    await asyncio.wait_for(env.service.stop(), 10)
    replies = Counter(subject for subject, _ in env.nc.published)
    assert replies == Counter(m.reply for m in msgs)  # every request answered exactly once
    assert env.service.stats.admitted == 3


async def test_requests_are_handled_concurrently() -> None:
    events: list[str] = []
    store = GatedStore(events)
    env = make_env(store, max_inflight=64)
    msgs = [env.msg(env.forge()) for _ in range(10)]
    for m in msgs:
        await env.service._on_message(m)  # returns at once: the work runs in its own task
    await asyncio.wait_for(store.when_active(10).wait(), 10)
    assert env.service.inflight == 10
    store.gate.set()
    await asyncio.wait_for(env.service.stop(), 10)
    assert len(env.nc.published) == 10


async def test_every_message_gets_exactly_one_publish() -> None:
    internal = ClientKey.generate()
    revoked = ClientKey.generate()
    broken = ClientKey.generate()
    unknown = ClientKey.generate()

    class PickyStore(MemoryStore):
        def get_nowait(self, key: str) -> bytes | None:
            if key == broken.public:
                raise RuntimeError("driver bug")
            return super().get_nowait(key)

    store = PickyStore()
    env = make_env(store, internal_keys=(internal.public,))
    store.records[env.client.public] = record("alice")
    store.records[revoked.public] = record("old", revoked=True)
    replayed = env.forge()
    inputs: list[tuple[Forged | bytes, str]] = [
        (env.forge(), d.ADMIT),
        (env.forge(client=internal), d.ADMIT_INTERNAL),
        (env.forge(client=unknown), d.UNKNOWN_USER),
        (env.forge(client=revoked), d.REVOKED),
        (env.forge(client=broken), d.INTERNAL_ERROR),
        (env.forge(overrides={"nats": {"connect_opts": {"sig": DELETE}}}), d.NO_SIGNATURE),
        (env.forge(client=None), d.NO_NKEY),
        (replayed, d.ADMIT),
        (replayed, d.REPLAY),
        (env.forge(seal_to=new_curve()[1]), d.XKEY_UNEXPECTED),
        (b"garbage", d.MALFORMED),
        (b"x" * (d.MAX_REQUEST_BYTES + 1), d.OVERSIZE),
    ]
    msgs = [env.msg(item) for item, _ in inputs]
    for m in msgs:
        await env.service._on_message(m)
    await asyncio.wait_for(env.service.stop(), 10)

    # A replay is dropped (no reply: the first answer already went to that inbox).
    answered = [(m, io) for m, io in zip(msgs, inputs, strict=True) if io[1] != d.REPLAY]
    msgs, inputs = [m for m, _ in answered], [io for _, io in answered]
    assert env.service.stats.dropped == 1
    published = Counter(subject for subject, _ in env.nc.published)
    assert published == Counter(m.reply for m in msgs)
    assert all(count == 1 for count in published.values())
    bodies = dict(env.nc.published)
    for m, (item, reason) in zip(msgs, inputs, strict=True):
        body = bodies[m.reply]
        if isinstance(item, bytes) or reason == d.XKEY_UNEXPECTED:
            assert body == b"", reason
            continue
        nats = env.reply_claims(body, item)["nats"]
        if reason in d.ADMIT_REASONS:
            assert "jwt" in nats, reason
        else:
            assert nats.get("error") == reason
    stats = env.service.stats
    assert stats.requests == stats.replies + stats.dropped == len(msgs) + 1
    assert stats.admitted == 3 and stats.denied == len(msgs) - 3
    assert env.service.inflight == 0


async def test_stop_answers_what_was_taken() -> None:
    events: list[str] = []
    store = GatedStore(events)
    env = make_env(store)
    msgs = [env.msg(env.forge()) for _ in range(3)]
    for m in msgs:
        await env.service._on_message(m)
    await asyncio.wait_for(store.when_active(3).wait(), 10)
    stopping = asyncio.create_task(env.service.stop())
    await _spin()
    assert not stopping.done()  # waits for the three in flight
    store.gate.set()
    await asyncio.wait_for(stopping, 10)
    assert len(env.nc.published) == 3


async def test_stop_answers_in_flight_requests_even_when_drain_fails() -> None:
    # A dead connection cannot drain the subscription; what the service holds is still answered.
    events: list[str] = []
    store = GatedStore(events)
    env = make_env(store, max_inflight=4)
    store.records[env.client.public] = record("alice")

    class BrokenSub:
        unsubscribed = False
        pending_msgs = 0

        async def drain(self) -> None:
            raise ConnectionError("connection closed")

        async def unsubscribe(self) -> None:
            self.unsubscribed = True

    sub = BrokenSub()
    env.service._sub = sub  # type: ignore[assignment]
    msgs = [env.msg(env.forge()) for _ in range(2)]
    for m in msgs:
        await env.service._on_message(m)
    await asyncio.wait_for(store.when_active(2).wait(), 10)
    stopping = asyncio.create_task(env.service.stop())
    store.gate.set()
    await asyncio.wait_for(stopping, 10)
    assert sub.unsubscribed and not env.service.subscribed
    assert sorted(subject for subject, _ in env.nc.published) == sorted(m.reply for m in msgs)


# ---------------------------------------------------------------------------------------------
# the synchronous path: no task when no I/O is needed
# ---------------------------------------------------------------------------------------------
async def test_an_answer_from_memory_is_sent_inside_the_callback() -> None:
    internal = ClientKey.generate()
    env = make_env(internal_keys=(internal.public,))
    known, inside, garbage = env.forge(), env.forge(client=internal), b"garbage"
    for item in (known, inside, garbage):
        msg = env.msg(item)
        await env.service._on_message(msg)
        # Published before the callback returned, and no task was started for it.
        assert env.nc.published[-1][0] == msg.reply
        assert env.service.inflight == 0 and not env.service._tasks
    assert env.store.lookups == 1  # the internal key and the garbage were never looked up
    assert env.service.stats.admitted == 2 and env.service.stats.denied == 1


async def test_a_lookup_that_would_block_gets_a_task() -> None:
    env = make_env()
    env.store.delay = 0.01  # get_nowait cannot answer: only the awaited read can
    forged = env.forge()
    msg = env.msg(forged)
    await env.service._on_message(msg)
    assert env.nc.published == [] and env.service.inflight == 1
    await asyncio.wait_for(env.service.stop(), 10)
    assert "jwt" in env.reply_claims(env.only_reply(msg), forged)["nats"]


async def test_callback_work_gives_the_loop_a_turn_every_slice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = make_env()

    class Waiting:  # the subscription's queue: messages wait behind the one in the callback
        pending_msgs = 3

    env.service._sub = Waiting()  # type: ignore[assignment]

    async def run(slice_s: float) -> list[int]:
        """How many loop callbacks had run after each of four messages."""
        monkeypatch.setattr("callout.service.SLICE", slice_s)
        env.service._slice_began = None
        loop = asyncio.get_running_loop()
        turns: list[int] = []
        progress = []
        # Callbacks as nats-py runs them: one after another, never yielding in between.
        for i in range(4):
            loop.call_soon(turns.append, i)  # runs only when the loop gets a turn
            await env.service._on_message(env.msg(env.forge()))
            progress.append(len(turns))
        await asyncio.sleep(0)
        assert turns == [0, 1, 2, 3]
        return progress

    # A long slice: four answers in a row, the loop's own callbacks waiting meanwhile.
    assert await run(3600.0) == [0, 0, 0, 0]
    # A slice already over after one message: a turn after every second one (a run of work
    # starts with a message and is checked after the next).
    assert await run(0.0) == [0, 2, 2, 4]
    # Nothing waiting: no turn asked for (the subscription's task waits for the next message,
    # which is the loop's turn anyway).
    Waiting.pending_msgs = 0
    assert await run(0.0) == [0, 0, 0, 0]
    assert len(env.nc.published) == 12 and env.service.stats.admitted == 12


async def test_a_backlog_in_the_subscription_queue_sheds_the_oldest() -> None:
    env = make_env()

    class QueuedSub:
        pending_msgs = 5  # messages behind the one in the callback

    env.service._sub = QueuedSub()  # type: ignore[assignment]
    env.service.max_backlog = 5
    msg = env.msg(env.forge())
    await env.service._on_message(msg)
    # The one in the callback is the oldest: denied at once (the empty body), no lookup.
    assert env.nc.published == [(msg.reply, b"")]
    assert env.store.lookups == 0 and env.service.stats.shed == 1
    QueuedSub.pending_msgs = 4
    forged = env.forge()
    msg = env.msg(forged)
    await env.service._on_message(msg)
    assert "jwt" in env.reply_claims(env.nc.published[-1][1], forged)["nats"]


@pytest.mark.parametrize(
    ("choice", "logged"),
    [("all", ["admit", "deny"]), ("deny", ["deny"]), ("none", [])],
)
async def test_log_decisions_picks_the_lines_but_not_the_observers(
    choice: str, logged: list[str]
) -> None:
    env = make_env()
    env.service.log_decisions = choice  # type: ignore[assignment]
    seen: list[str] = []
    env.service.observers.append(lambda decision, latency: seen.append(decision.reason))
    with captured_logs() as logs:
        await env.service._on_message(env.msg(env.forge()))
        await env.service._on_message(env.msg(b"garbage"))
    assert [fields["decision"] for _, fields in logs.named("decision")] == logged
    assert seen == [d.ADMIT, d.MALFORMED]


async def test_a_line_the_log_cannot_write_does_not_cost_the_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = make_env()

    def broken(event: str, fields: dict[str, object]) -> None:
        raise ValueError("cannot write this line")

    monkeypatch.setattr(log, "info_fields", broken)
    forged = env.forge()
    msg = env.msg(forged)
    await env.handle(msg)
    # The line is logged first (before the reply's flush), yet its failure is the line's alone.
    assert "jwt" in env.reply_claims(env.only_reply(msg), forged)["nats"]
    assert env.service.stats.admitted == 1


def test_a_value_orjson_cannot_write_is_still_logged() -> None:
    line = log._render_json(1.0, logging.INFO, "decision", {"cid": 2**70, "host": "h"})
    assert orjson.loads(line.replace(str(2**70), "0")) == {
        "ts": 1.0,
        "level": "info",
        "event": "decision",
        "cid": 0,
        "host": "h",
    }
    assert str(2**70) in line
