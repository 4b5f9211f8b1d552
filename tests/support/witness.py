"""What every fault scenario measures, and how.

A scenario connects real clients by hand (`raw_connect`) before, during and after a fault,
in three roles: a *known* user (a record that admits), a *revoked* user (a record that says
revoked) and *unknown* users (a fresh key per attempt, never in the bucket). Each attempt
becomes an `Outcome`; a `Tally` per test checks the issue's three promises:

- no wrong admit: a revoked or unknown user is never admitted, during or after the fault;
- every request answered while the service is up: a deny carries *our* reason in the
  server's `$SYS.ACCOUNT.CLIENT.AUTH.ERR` event (the server's own timeout leaves it empty,
  docs/protocol.md §3 "Outcomes and timing") and comes within `--backend-timeout` + 100 ms;
- recovery on its own: the known user is admitted again, within a deadline.

The reason of a deny is read from the server's event, routed per connection by a `Witness`
(an AUTH-account connection; several probes run at once, so events are not consumed in
arrival order). The tallies of a run are summed up at the end of the session
(`tests/faults/conftest.py`), which is where the figures in docs/reliability.md come from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from tests.support.nats import (
    AUTH_SUBJECT,
    SERVICE_ERROR,
    Keys,
    nats_connect,
    new_user,
    on_auth_errors,
    raw_connect,
)
from tests.support.wait import eventually

#: The event reason for an empty-body answer (§3 check 1): an explicit, immediate deny too.
EMPTY_BODY = 'Auth callout violation: "no reason supplied"'
#: Roles that must never be admitted.
MUST_DENY = frozenset(
    {
        "revoked",
        "revoked_late",
        "revoked_seen",
        "unknown",
        "forgotten",
        "garbage",
        "bad",
        "replayed",
    }
)
#: --backend-timeout of every service in these tests: short, so the deny bound is quick to test.
BACKEND_TIMEOUT = 0.5
#: The slack the issue allows over --backend-timeout for a deny.
DENY_SLACK = 0.1
#: How long the users cache may go on answering from its copy when it cannot confirm it (a
#: stalled JetStream): a confirmation answers for 80 ms after the probe that gave it was sent,
#: and the contract is 100 ms (README, "The users cache"). A user revoked just as such a fault
#: begins may be admitted until then, by design; any later admit is a wrong one.
CACHE_STALENESS = 0.1
#: Client-side bound on one connect: above every server timeout used here, so a connect that
#: nobody answers ends in the server's "Authorization Violation", not a client timeout.
CONNECT_TIMEOUT = 6.0


@dataclass(frozen=True)
class Outcome:
    role: str
    admitted: bool
    # "admit", our deny reason, "empty_body"; or not ours: "timeout" (the server's),
    # "no_answer" (not even the server's), "no_event", "server: <the server's own reason>"
    reason: str
    elapsed: float
    up: bool = True  # the service was up, so it had to answer
    bounded: bool = True  # the deny-latency bound applies (not to a flood's backlog)
    # (server id, client id) from the server's INFO: the service logs the same pair (`server`,
    # `cid`) for every request it handles, so its log tells whether a request reached it.
    conn: tuple[str, int] | None = None

    @property
    def ours(self) -> bool:
        """Answered by the service (an admit, or a deny it sent), not by the server's timeout."""
        return self.admitted or not (
            self.reason in ("timeout", "no_answer", "no_event") or self.reason.startswith("server:")
        )


@dataclass
class Tally:
    name: str
    bound: float  # --backend-timeout + DENY_SLACK
    outcomes: list[Outcome] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)  # figures for the summary
    # Outcomes taken out of the checks, with the reason why, and shown apart in the summary.
    excused: list[tuple[Outcome, str]] = field(default_factory=list)
    # The test is an expected failure demonstrating a known bug: totalled apart.
    known_bug: bool = False

    def add(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        return outcome

    def unbound(self, outcomes: Sequence[Outcome]) -> None:
        """Exempt these outcomes from the latency bound (they must still be answered)."""
        ids = {id(o) for o in outcomes}
        self.outcomes = [
            dataclasses.replace(o, bounded=False) if id(o) in ids else o for o in self.outcomes
        ]

    def relabel(self, outcomes: Sequence[Outcome], role: str) -> None:
        ids = {id(o) for o in outcomes}
        self.outcomes = [
            dataclasses.replace(o, role=role) if id(o) in ids else o for o in self.outcomes
        ]

    def excuse(self, outcomes: Sequence[Outcome], why: str) -> None:
        """Take these out of the checks (never out of the wrong-admit check: an excused
        outcome that is a wrong admit stays one) and report them apart."""
        ids = {id(o) for o in outcomes if not (o.admitted and o.role in MUST_DENY)}
        self.excused += [(o, why) for o in self.outcomes if id(o) in ids]
        self.outcomes = [o for o in self.outcomes if id(o) not in ids]

    @property
    def wrong_admits(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.admitted and o.role in MUST_DENY]

    @property
    def unanswered(self) -> list[Outcome]:
        """Requests the service left to the server's timeout, or answered too late, while up."""
        return [
            o
            for o in self.outcomes
            if o.up and not o.admitted and (not o.ours or (o.bounded and o.elapsed > self.bound))
        ]

    @property
    def worst_deny(self) -> float:
        return max(
            (o.elapsed for o in self.outcomes if o.up and o.bounded and not o.admitted and o.ours),
            default=0.0,
        )

    def reasons(self, role: str) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for o in self.outcomes:
            if o.role == role:
                counts[o.reason] += 1
        return dict(counts)

    def check(self) -> None:
        assert self.wrong_admits == [], f"{self.name}: wrongly admitted {self.wrong_admits}"
        assert self.unanswered == [], f"{self.name}: unanswered while up {self.unanswered}"


#: Every tally of the session, for the summary printed at the end (conftest.py).
TALLIES: list[Tally] = []


def parse_reason(event_reason: str) -> str:
    if event_reason.startswith(SERVICE_ERROR):
        return event_reason[len(SERVICE_ERROR) :]
    if event_reason.startswith(EMPTY_BODY):
        return "empty_body"
    if event_reason == "":
        return "timeout"
    return f"server: {event_reason}"  # the server refused our answer: not an answer either


class Witness:
    """`$SYS.ACCOUNT.CLIENT.AUTH.ERR` events of the callout account, by connection: the server's
    id and the client id it gave the connection (both in its INFO), so two attempts with one
    key, or a client denied before it even named its key, are told apart."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._queues: dict[tuple[str, int], asyncio.Queue[dict[str, Any]]] = defaultdict(
            asyncio.Queue
        )

    @classmethod
    async def open(cls, url: str, keys: Keys, **options: Any) -> Witness:
        nc = await nats_connect(url, keys.service_seed, **options)
        witness = cls(nc)
        await on_auth_errors(nc, witness._on_event)
        return witness

    def _on_event(self, event: dict[str, Any]) -> None:
        connection = (event.get("server", {}).get("id", ""), event.get("client", {}).get("id", 0))
        self._queues[connection].put_nowait(event)

    async def reason(self, info: dict[str, Any], timeout: float = 2.0) -> str:
        """The deny reason of the connection whose INFO this is."""
        queue = self._queues[(info.get("server_id", ""), info.get("client_id", 0))]
        event = await asyncio.wait_for(queue.get(), timeout)
        return parse_reason(str(event.get("reason", "")))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


async def attempt(witness: Witness, url: str, seed: str, role: str) -> Outcome | None:
    """One connect. None when the server itself was unreachable (no request was made)."""
    start = time.monotonic()
    try:
        result = await raw_connect(url, seed, timeout=CONNECT_TIMEOUT)
    except TimeoutError:
        return Outcome(role, False, "no_answer", time.monotonic() - start)
    except (OSError, ConnectionError):
        return None
    conn = (str(result.info.get("server_id", "")), int(result.info.get("client_id", 0)))
    if result.admitted:
        return Outcome(role, True, "admit", result.elapsed, conn=conn)
    if result.error == "connection closed":
        return None  # closed without -ERR: the server went down mid-connect
    try:
        reason = await witness.reason(result.info)
    except TimeoutError:
        reason = "no_event"  # the witness was cut off too (a server restart): not provably ours
    return Outcome(role, False, reason, result.elapsed, conn=conn)


async def tried(tally: Tally, witness: Witness, url: str, seed: str, role: str) -> Outcome:
    """`attempt`, against a server that is up; the outcome is tallied."""
    outcome = await attempt(witness, url, seed, role)
    assert outcome is not None, f"{url} did not take the connection"
    return tally.add(outcome)


@dataclass
class Users:
    """The users a scenario probes with: one known, one revoked; unknown ones are fresh."""

    known: tuple[str, str] = field(default_factory=new_user)
    revoked: tuple[str, str] = field(default_factory=new_user)
    other: dict[str, str] = field(default_factory=dict)  # more roles: role -> seed

    def seed(self, role: str) -> str:
        if role == "known":
            return self.known[0]
        if role == "revoked":
            return self.revoked[0]
        if role in self.other:
            return self.other[role]
        return new_user()[0]


class Probes:
    """Each role connecting in its own loop (one attempt at a time per role) until stopped.
    A test marks when the service goes down and comes back (`going_down` / `back_up`); an
    attempt counts as made while the service was up only if it was up the whole time, from
    the attempt's start to its end."""

    def __init__(
        self,
        witness: Witness,
        url: Callable[[], str] | str,
        tally: Tally,
        users: Users,
        roles: Sequence[str] = ("known", "revoked", "unknown"),
        pace: float = 0.02,
    ) -> None:
        self.witness = witness
        self._url = url if callable(url) else (lambda: url)
        self.tally = tally
        self.users = users
        self.roles = roles
        self.pace = pace
        self.up = True
        self._outages = 0
        self.seen: list[tuple[float, Outcome]] = []  # (monotonic start, outcome)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def going_down(self) -> None:
        self.up = False
        self._outages += 1

    def back_up(self) -> None:
        self.up = True

    def start(self) -> Probes:
        self._tasks = [asyncio.create_task(self._loop(role)) for role in self.roles]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _loop(self, role: str) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            up, outages = self.up, self._outages
            outcome = await attempt(self.witness, self._url(), self.users.seed(role), role)
            if outcome is not None:
                # A request still on its way when the fault hit was made to a service that
                # was going down.
                up = up and self.up and self._outages == outages
                outcome = dataclasses.replace(outcome, up=up)
                self.seen.append((started, self.tally.add(outcome)))
            # Paces the load (a few dozen connects per second); nothing waits on it.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.pace)

    def since(self, moment: float, role: str | None = None) -> list[Outcome]:
        return [o for t, o in self.seen if t >= moment and (role is None or o.role == role)]

    def streak(self, role: str, since: float) -> int:
        """How many of `role`'s latest attempts since `since` were admitted, running."""
        count = 0
        for outcome in reversed(self.since(since, role)):
            if not outcome.admitted:
                break
            count += 1
        return count

    def denied_with(self, role: str, reason: str, since: float) -> bool:
        return any(o.reason == reason for o in self.since(since, role))

    def within_staleness(self, role: str, revoked: float) -> int:
        """Relabel `role`'s admits that started within CACHE_STALENESS of `revoked` (the cache
        may still hold the record from before): they are reported, not counted as wrong.
        Returns how many there were."""
        early = [
            o
            for t, o in self.seen
            if o.role == role and o.admitted and t - revoked <= CACHE_STALENESS
        ]
        self.tally.relabel(early, "revoked_within_staleness")
        return len(early)

    async def recovered(self, since: float, within: float) -> None:
        """Wait until the known user is admitted 3 times in a row after `since` (within
        `within` s), and then until every role has 3 outcomes after `since`."""
        await eventually(lambda: self.streak("known", since) >= 3, within)
        await eventually(lambda: all(len(self.since(since, role)) >= 3 for role in self.roles))


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def importer_accounts(keys: Keys, importer_pub: str, name: str) -> dict[str, str]:
    """`extra_accounts` for render_config: AUTH as usual plus an export of the auth subject,
    and an account `name` whose user imports it. nats-server denies every user of the callout
    account publishing on `$SYS.REQ.USER.AUTH` (docs/protocol.md §3 check 16), so an import is
    the only way a client can put a message there."""
    auth = (
        f'users: [ {{ nkey: "{keys.service_pub}" }} ]\n'
        "    jetstream: enabled\n"
        f'    exports: [ {{ service: "{AUTH_SUBJECT}" }} ]'
    )
    other = (
        f'users: [ {{ nkey: "{importer_pub}" }} ]\n'
        f'    imports: [ {{ service: {{ account: AUTH, subject: "{AUTH_SUBJECT}" }} }} ]'
    )
    return {"AUTH": auth, name: other}


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {"n": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99),
            "max": round(ordered[-1] * 1000, 1)}  # fmt: skip
