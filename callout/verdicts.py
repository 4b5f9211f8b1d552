"""The server's verdict on our admits: nats-server checks every response we send (docs/protocol.md
§3, "Checks, in server order") and may still reject a connection we admitted, e.g. a record
naming an account the server does not have, or an issuer key the server does not trust. The
client only sees `Authorization Violation`, our own log says `admit`: nothing else shows the
misconfiguration.

nats-server reports every auth failure as a `$SYS.ACCOUNT.CLIENT.AUTH.ERR` event in the callout
account (docs/protocol.md §3, "What the client sees on deny") with the server id, the connection id
(`client.id`, the request's `client_info.id`) and its reason. We keep the recent admits of
this replica by (server id, connection id); an event matching one is the server overruling us:
logged at error level with the server's reason, and counted by kind.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from callout import log
from callout.decision import Decision
from callout.metrics import Metrics

SUBJECT: Final = "$SYS.ACCOUNT.CLIENT.AUTH.ERR"
# The prefix the server puts before the `error` of a deny we sent (docs/protocol.md §3 check 7):
# our own denies, not a verdict on an admit.
OUR_DENY: Final = "Auth callout service returned an error"
MAX_EVENT_BYTES: Final = 64 * 1024
# The server checks a response as soon as it arrives; its event follows within milliseconds.
# An event can still overtake our own bookkeeping of the admit (both race on the event loop),
# so an unmatched event is looked up once more after RECHECK seconds.
RECHECK: Final = 0.1
ADMIT_TTL: Final = 30.0

# Server reason text -> a bounded metric label. First match wins; see docs/protocol.md §3.
_KINDS: Final = (
    ("No valid account", "unknown_account"),
    ("Wrong issuer", "wrong_issuer"),
    ("signing key is unknown", "wrong_issuer"),
    ("issuer_account", "wrong_issuer"),
    ("Error validating user JWT", "invalid_user_jwt"),
    ("Permission Subject", "invalid_user_jwt"),
    ("not for expected user", "wrong_recipient"),
    ("not for server", "wrong_recipient"),
    ("Expected authorized user", "wrong_recipient"),
    ("outside of valid connect times", "connect_limits"),
    ("invalid connection type", "connect_limits"),
    ("Proxy connection required", "proxy_required"),
    ("decrypt", "xkey"),
)


def classify(reason: str) -> str:
    lowered = reason.lower()
    for needle, kind in _KINDS:
        if needle.lower() in lowered:
            return kind
    return "other"


# Not frozen: one is built per admit, and a frozen dataclass's __init__ costs five times more.
@dataclass(slots=True)
class _Admit:
    client: str
    reason: str
    account: str
    name: str
    at: float


class Verdicts:
    def __init__(
        self, nc: Client, metrics: Metrics, *, capacity: int = 10_000, ttl: float = ADMIT_TTL
    ) -> None:
        self._nc = nc
        self._metrics = metrics
        self._capacity = capacity
        self._ttl = ttl
        self._admits: OrderedDict[tuple[str, int], _Admit] = OrderedDict()
        self._sub: Subscription | None = None
        self.rejections = 0

    async def start(self) -> None:
        # Not in the queue group: each replica must see the events for its own admits.
        self._sub = await self._nc.subscribe(SUBJECT, cb=self._on_event)
        await self._nc.flush()

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception as exc:
                log.debug("verdicts_unsubscribe_failed", exception=type(exc).__name__)

    def observe(self, decision: Decision, latency: float) -> None:
        request = decision.request
        if not decision.admit or request is None or not request.client_id:
            return
        now = time.monotonic()
        admits = self._admits
        while admits:  # insertion order is time order: expired entries are at the front
            _, oldest = next(iter(admits.items()))
            if now - oldest.at <= self._ttl and len(admits) < self._capacity:
                break
            admits.popitem(last=False)
        admits[(request.server_id, request.client_id)] = _Admit(
            decision.client_key, decision.reason, decision.account, decision.name, now
        )

    async def _on_event(self, msg: Msg) -> None:
        if len(msg.data) > MAX_EVENT_BYTES:
            return
        try:
            event: Any = orjson.loads(msg.data)
            server_id = event["server"]["id"]
            client_id = event["client"]["id"]
            reason = event.get("reason") or ""
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if not isinstance(server_id, str) or type(client_id) is not int:
            return
        if not isinstance(reason, str) or not reason or reason.startswith(OUR_DENY):
            return  # our own deny, or the server's timeout (reason "")
        key = (server_id, client_id)
        if not self._match(key, reason):
            asyncio.get_running_loop().call_later(RECHECK, self._match, key, reason)

    def _match(self, key: tuple[str, int], reason: str) -> bool:
        admit = self._admits.pop(key, None)
        if admit is None:
            return False
        kind = classify(reason)
        self.rejections += 1
        self._metrics.server_rejections.labels(kind=kind).inc()
        log.error(
            "server_rejected",
            client=admit.client,
            our_reason=admit.reason,
            account=admit.account,
            name=admit.name,
            server=key[0],
            cid=key[1],
            kind=kind,
            server_reason=reason[:500],
        )
        return True
