"""Replay recorded requests through the decision core and compare the decisions.

The input is recordings written by `callout serve --record-dir` (`callout.recording.writer`):
`*.jsonl`, one request per line, after a first line holding the policy the service decided
under (`callout.recording.policy`). Requests recorded under one policy go through ONE shared
`Authorizer`, in the order they arrived, so what depends on earlier requests (a replayed
request, a throttled key or host) is decided as it was. Each request drives the core as the
service does: `Authorizer.start`, then `resume` with the store's answer.

The policy: a recording's own, with `overrides` (Policy field -> value) applied over it; for
requests that carry none (a file without a policy line, recordings of format 1) the policy
given. Replaying a recording needs no secret: the recorded policy holds public keys only,
read back as stand-ins, and an encrypted request is fed as the server signed it, sealed again
to the stand-in of the xkey that opened it (`callout.recording.policy`), unless real xkeys are
given as an override: then the payload as received is fed.

Two clocks. A request is judged valid (exp, nbf, the replay memory) at its recorded arrival,
always: it was sent then. The policy's clock (the failure limits, and whatever else of the
policy depends on time) is the recorded arrival too (`at="recorded"`), or runs from the
present (`at="now"`), keeping the recording's spacing: the first request is decided now, each
next one as many seconds later as it arrived. Store lookups are answered from a users map (a
`--users` file, or the bucket); a store failure that was recorded
(`store_unavailable`, `store_timeout`) is answered the same way again, since it was the
environment, not the policy. A request shed under overload never reached the core and one
recorded without its payload cannot be fed again: both are skipped, never counted as changes.

A decision is the same when its outcome (admit / deny / drop), reason and account are, and,
when the recording has them, the permissions of an admit. The `detail` text is not compared.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from callout import xkey
from callout.decision import (
    STORE_TIMEOUT,
    STORE_UNAVAILABLE,
    Answer,
    Authorizer,
    Decision,
    Policy,
    StoreAnswer,
    TimedOut,
    Unavailable,
    store_answer,
)
from callout.keys import CurveKey
from callout.recording.reader import At, Entry, ReplayError, Users, Verdict

Lookup = Callable[[str], StoreAnswer]


# ---------------------------------------------------------------------------------------------
# feeding the core
# ---------------------------------------------------------------------------------------------
def answer(users: Users, key: str) -> StoreAnswer:
    return store_answer(users.get(key))


def feed(
    authorizer: Authorizer,
    payload: bytes,
    headers: Mapping[str, str] | None,
    now: float,
    lookup: Lookup,
    valid_at: float | None = None,
) -> Answer:
    """What the service does with a request (`callout.service`), driven the same way
    (`Authorizer.start`, then `resume` with the store's answer), the store lookup being
    `lookup`. `now` is the policy's clock, `valid_at` the request's (`Authorizer.open`)."""
    started = authorizer.start(payload, headers, now, valid_at=valid_at)
    if isinstance(started, Answer):
        return started
    return authorizer.resume(started, lookup(started.request.client_key), None, now)


@dataclass(frozen=True)
class Outcome:
    entry: Entry
    new: Verdict | None = None  # None when skipped
    decision: Decision | None = None
    # The response the core answered with (None: none sent, or skipped).
    body: bytes | None = None
    skipped: str | None = None

    @property
    def changed(self) -> bool:
        recorded = self.entry.recorded
        return self.new is not None and recorded is not None and recorded.differs(self.new)


@dataclass
class Replayer:
    """Feeds entries to the core. Recorded requests share one Authorizer per policy (fed in
    arrival order)."""

    # For entries that carry no policy of their own (format-1 recordings, files without a
    # policy line); None: such an entry is an error.
    policy: Policy | None = None
    users: Users = field(default_factory=dict)
    at: At = "recorded"
    # False: `users` holds only the keys read for this replay (a bucket); a lookup of any
    # other key is an error, never "no record". True: a key not in `users` has no record.
    complete: bool = True
    clock: Callable[[], float] = time.time
    # Policy field -> value, applied over every recorded policy (the replay's flags).
    overrides: Mapping[str, Any] = field(default_factory=dict)
    authorizer: Authorizer | None = field(init=False)  # the one for `policy`
    _recorded: dict[bytes, Authorizer] = field(init=False, default_factory=dict)
    _shift: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.authorizer = Authorizer(self.policy) if self.policy is not None else None

    def _authorizer(self, entry: Entry) -> Authorizer:
        recorded = entry.policy
        if recorded is None:
            if self.policy is None or self.authorizer is None:
                raise ReplayError(f"{entry.source}: recorded without its policy: give the flags")
            return self.authorizer
        authorizer = self._recorded.get(recorded.key)
        if authorizer is None:
            policy = dataclasses.replace(recorded.policy, **self.overrides)
            authorizer = self._recorded[recorded.key] = Authorizer(policy)
        return authorizer

    def _payload(self, entry: Entry) -> bytes | None:
        """A request recorded opened is sealed again, from the server's recorded xkey to the
        key of this replay's policy that stands for the one that opened it: its stand-in, or
        the real key when seeds are given; a fresh key, which opens nothing, when the policy
        has no such key (then the box does not open, as it would not have)."""
        if entry.opened_with is None or entry.payload is None:
            return entry.payload
        try:
            server = xkey.server_key((entry.headers or {}).get(xkey.HEADER, ""))
        except xkey.XkeyError:
            return entry.payload  # the core says what is wrong with it, as it did
        keys: Mapping[str, CurveKey]
        if "xkeys" in self.overrides:
            keys = {key.public: key for key in self.overrides["xkeys"]}
        elif entry.policy is not None:
            keys = entry.policy.xkeys
        else:
            keys = {key.public: key for key in self.policy.xkeys} if self.policy else {}
        ours = keys.get(entry.opened_with) or CurveKey.generate()
        return xkey.seal(entry.payload, ours, server)

    def run(self, entry: Entry) -> Outcome:
        if entry.skip is not None or entry.payload is None:
            return Outcome(entry, skipped=entry.skip or "no payload")
        authorizer = self._authorizer(entry)
        payload = self._payload(entry)
        assert payload is not None
        if self.at == "recorded":
            now = entry.received_at
        else:
            if self._shift is None:
                self._shift = self.clock() - entry.received_at
            now = entry.received_at + self._shift
        lookup = self._lookup(entry, self.users)
        answer = feed(authorizer, payload, entry.headers, now, lookup, entry.received_at)
        return Outcome(entry, Verdict.of(answer.decision), answer.decision, answer.body)

    def _lookup(self, entry: Entry, users: Users) -> Lookup:
        recorded = entry.recorded.reason if entry.recorded is not None else ""
        if recorded == STORE_TIMEOUT:
            return lambda _key: TimedOut()
        if recorded == STORE_UNAVAILABLE:
            return lambda _key: Unavailable(entry.detail or "recorded as unavailable")
        return lambda key: self._answer(users, key)

    def _answer(self, users: Users, key: str) -> StoreAnswer:
        if not self.complete and key not in users:
            raise ReplayError(f"the core looked up {key}, which the users were not read for")
        return answer(users, key)

    def run_all(self, entries: Iterable[Entry]) -> Iterator[Outcome]:
        for entry in entries:
            yield self.run(entry)


@dataclass
class Summary:
    replayed: int = 0
    unchanged: int = 0
    changes: Counter[str] = field(default_factory=Counter)  # "old -> new" -> count
    skipped: Counter[str] = field(default_factory=Counter)  # why -> count

    @property
    def changed(self) -> int:
        return sum(self.changes.values())

    def add(self, outcome: Outcome) -> None:
        if outcome.skipped is not None or outcome.new is None:
            self.skipped[outcome.skipped or "no payload"] += 1
            return
        self.replayed += 1
        recorded = outcome.entry.recorded
        if recorded is not None and outcome.changed:
            self.changes[recorded.change(outcome.new)] += 1
        else:
            self.unchanged += 1
