"""The revoker's ledger without a server: which connections it kicks, and when."""

from __future__ import annotations

from typing import Any

import orjson

from callout.decision import ADMIT, Decision, Request
from callout.revocation import Revoker


class FakeSystem:
    def __init__(self) -> None:
        self.kicks: list[tuple[str, int]] = []

    async def request(self, subject: str, payload: bytes, timeout: float) -> Any:
        self.kicks.append((subject.split(".")[3], orjson.loads(payload)["cid"]))

        class Reply:
            data = b'{"data":{}}'

        return Reply()


def admitted(key: str, cid: int, opened_at: float) -> Decision:
    request = Request("NSERVER", "UNKEY", key, 0.0, False, None, client_id=cid, opened_at=opened_at)
    return Decision(ADMIT, "", request, "APP", "", client_key=key)


async def test_a_connection_admitted_after_its_revocation_was_seen_is_kicked() -> None:
    system = FakeSystem()
    revoker = Revoker(system, user_ttl=3600)  # type: ignore[arg-type]
    revoker.observe(admitted("UALICE", 1, opened_at=1.0), 0.0)
    # The revocation arrives while a second connect of alice is still being decided ...
    revoker.record_changed("UALICE", b"{}", orjson.dumps({"revoked": True}))
    revoked_at = revoker._recent["UALICE"]
    # ... and that connect is admitted after the kick went out (it read the old record).
    revoker.observe(admitted("UALICE", 2, opened_at=revoked_at - 0.5), 0.0)
    # A connect opened after the revocation was seen is not kicked (it was decided on it).
    revoker.observe(admitted("UBOB", 3, opened_at=revoked_at + 1), 0.0)
    await revoker.stop()
    assert sorted(system.kicks) == [("NSERVER", 1), ("NSERVER", 2)]


async def test_keep_sessions_and_unrelated_changes_kick_nothing() -> None:
    system = FakeSystem()
    revoker = Revoker(system, user_ttl=0)  # type: ignore[arg-type]
    revoker.observe(admitted("UCAROL", 7, opened_at=1.0), 0.0)
    revoker.record_changed("UCAROL", b"{}", orjson.dumps({"revoked": True, "keep_sessions": True}))
    revoker.record_changed("UCAROL", b"{}", orjson.dumps({"name": "renamed"}))
    await revoker.stop()
    assert system.kicks == []
    revoker.record_changed("UCAROL", b"{}", None)  # deleted: kicked
    await revoker.stop()
    assert system.kicks == [("NSERVER", 7)]
