"""The revoker's ledger without a server: which connections it kicks, and when."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from callout.decision import ADMIT, WOULD_DENY, Decision, Grant, Policy, Request
from callout.records import UNRESTRICTED, Permissions, Rules
from callout.revocation import Revoker
from tests.support.nats import make_keys
from tests.support.service import APP, policy_for, record

ORDERS = Permissions(pub=Rules(("orders.>",)))


class FakeSystem:
    def __init__(self) -> None:
        self.kicks: list[tuple[str, int]] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        self.kicks.append((subject.split(".")[3], orjson.loads(payload)["cid"]))

        class Reply:
            data = b'{"data":{}}'

        return Reply()


def admitted(
    key: str,
    cid: int,
    opened_at: float,
    permissions: Permissions = UNRESTRICTED,
    reason: str = ADMIT,
) -> Decision:
    request = Request("NSERVER", "UNKEY", key, 0.0, False, None, client_id=cid, opened_at=opened_at)
    return Decision(reason, "", request, APP, "", permissions, client_key=key)


def revoker(user_ttl: float = 3600, **policy: Any) -> tuple[Revoker, FakeSystem]:
    system = FakeSystem()
    built: Policy = policy_for(make_keys(), **policy)
    return Revoker(system, user_ttl, built), system  # type: ignore[arg-type]


async def test_a_connection_admitted_after_its_revocation_was_seen_is_kicked() -> None:
    rev, system = revoker()
    rev.observe(admitted("UALICE", 1, opened_at=1.0), 0.0)
    # The revocation arrives while a second connect of alice is still being decided ...
    rev.record_changed("UALICE", b"{}", orjson.dumps({"revoked": True}))
    revoked_at = rev._recent["UALICE"][0]
    # ... and that connect is admitted after the kick went out (it read the old record).
    rev.observe(admitted("UALICE", 2, opened_at=revoked_at - 0.5), 0.0)
    # A connect opened after the revocation was seen is not kicked (it was decided on it).
    rev.observe(admitted("UBOB", 3, opened_at=revoked_at + 1), 0.0)
    await rev.stop()
    assert sorted(system.kicks) == [("NSERVER", 1), ("NSERVER", 2)]


async def test_keep_sessions_and_unrelated_changes_kick_nothing() -> None:
    rev, system = revoker(user_ttl=0)
    rev.observe(admitted("UCAROL", 7, opened_at=1.0), 0.0)
    rev.record_changed("UCAROL", b"{}", orjson.dumps({"revoked": True, "keep_sessions": True}))
    rev.record_changed("UCAROL", b"{}", orjson.dumps({"name": "renamed"}))
    await rev.stop()
    assert system.kicks == []
    rev.record_changed("UCAROL", b"{}", None)  # deleted: kicked
    await rev.stop()
    assert system.kicks == [("NSERVER", 7)]


async def test_a_narrowed_record_kicks_only_the_connections_it_narrows() -> None:
    rev, system = revoker()
    rev.observe(admitted("UDAVE", 1, 1.0, UNRESTRICTED), 0.0)
    rev.observe(admitted("UDAVE", 2, 1.0, ORDERS), 0.0)
    # Narrower than the unrestricted grant of connection 1, the same as connection 2's.
    rev.record_changed("UDAVE", b"{}", record("d", pub_allow=["orders.>"]))
    await rev.stop()
    assert system.kicks == [("NSERVER", 1)]
    # Wider: nothing.
    rev.record_changed("UDAVE", b"{}", record("d", pub_allow=["orders.>", "x"]))
    await rev.stop()
    assert system.kicks == [("NSERVER", 1)]
    # Moved to another account: kicked.
    rev.record_changed("UDAVE", b"{}", record("d", account="SYS"))
    await rev.stop()
    assert system.kicks == [("NSERVER", 1), ("NSERVER", 2)]


async def test_every_load_reconciles_the_ledger() -> None:
    rev, system = revoker()
    # Admitted from direct lookups before the cache went live; then the first load comes.
    rev.observe(admitted("UALICE", 1, 1.0), 0.0)  # revoked before the load finished
    rev.observe(admitted("UBOB", 2, 1.0), 0.0)  # unchanged
    rev.observe(admitted("UCAROL", 3, 1.0), 0.0)  # deleted: not in the copy
    rev.observe(admitted("UDAVE", 4, 1.0), 0.0)  # narrowed
    rev.loaded(
        {
            "UALICE": record("alice", revoked=True),
            "UBOB": record("bob"),
            "UDAVE": record("dave", sub_allow=["_INBOX.>"]),
        }
    )
    await rev.stop()
    assert sorted(system.kicks) == [("NSERVER", 1), ("NSERVER", 3), ("NSERVER", 4)]
    # A reload that finds bob revoked too (a change made while the watch was not looking).
    rev.loaded({"UBOB": record("bob", revoked=True)})
    await rev.stop()
    assert sorted(system.kicks) == [("NSERVER", c) for c in (1, 2, 3, 4)]


async def test_a_connection_deciding_during_a_load_is_checked_against_it() -> None:
    rev, system = revoker()
    rev.loaded({"UALICE": record("alice", revoked=True)})
    loaded_at = rev._loaded_at
    rev.observe(admitted("UALICE", 1, opened_at=loaded_at - 0.2), 0.0)  # read the old record
    rev.observe(admitted("UALICE", 2, opened_at=loaded_at + 0.2), 0.0)  # decided on the new
    await rev.stop()
    assert system.kicks == [("NSERVER", 1)]


async def test_soft_mode_admits_are_in_the_ledger() -> None:
    defaults = Permissions(pub=Rules(("public.>",)))
    rev, system = revoker(mode="soft", default_permissions=defaults)
    soft = admitted("UERIN", 5, 1.0, defaults, reason=WOULD_DENY)
    assert soft.grant == Grant(APP, defaults)
    rev.observe(soft, 0.0)
    # Still no record at the next load: it keeps its session (a soft admit stands).
    rev.loaded({})
    rev.record_changed("UERIN", None, record("erin", pub_allow=["public.>", "x.>"]))  # wider
    await rev.stop()
    assert system.kicks == []
    rev.record_changed("UERIN", None, None)  # deleted: soft mode denies it now, so kicked
    await rev.stop()
    assert system.kicks == [("NSERVER", 5)]


async def test_the_recent_changes_are_bounded_in_time_without_a_scan_per_change() -> None:
    rev, _ = revoker()
    for i in range(1000):
        rev.record_changed(f"U{i}", None, record("x"))
    first = next(iter(rev._recent))
    at, answer = rev._recent[first]
    rev._recent[first] = (at - 120, answer)  # pretend it is old
    rev.record_changed("ULAST", None, record("x"))
    assert first not in rev._recent and len(rev._recent) == 1000
    await asyncio.sleep(0)
