"""Replay recorded requests through the decision core and compare the decisions.

The input is recordings written by `callout serve --record-dir` (`callout.recording`):
`*.jsonl`, one request per line, after a first line holding the policy the service decided
under (`callout.recorded_policy`). Requests recorded under one policy go through ONE shared
`Authorizer`, in the order they arrived, so what depends on earlier requests (a replayed
request, a throttled key or host) is decided as it was. Each request drives the core as the
service does: `Authorizer.start`, then `resume` with the store's answer.

The policy: a recording's own, with `overrides` (Policy field -> value) applied over it; for
requests that carry none (a file without a policy line, recordings of format 1) the policy
given. Replaying a
recording needs no secret: the recorded policy holds public keys only, read back as stand-ins,
and an encrypted request is fed as the server signed it, sealed again to the stand-in of the
xkey that opened it (`recorded_policy`), unless real xkeys are given as an override: then
the payload as received is fed.

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

import base64
import binascii
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from callout import recorded_policy, recording, xkey
from callout.decision import (
    OVERLOADED,
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
from callout.recorded_policy import RecordedPolicy

At = Literal["recorded", "now"]
# key -> the record's bytes, or None for "no record" (a case file can say so explicitly).
Users = Mapping[str, bytes | None]
Lookup = Callable[[str], StoreAnswer]


class ReplayError(ValueError):
    """The input cannot be replayed at all (message for the user)."""


# ---------------------------------------------------------------------------------------------
# decisions, as compared
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: str  # admit | deny | drop
    reason: str
    account: str | None = None
    # Admits only; None when the source did not record them (then they are not compared).
    permissions: dict[str, Any] | None = None

    @classmethod
    def of(cls, decision: Decision) -> Verdict:
        return cls(
            recording.outcome(decision),
            decision.reason,
            (decision.account or None) if decision.admit else None,
            decision.permissions.claims() if decision.admit else None,
        )

    def label(self) -> str:
        where = f"@{self.account}" if self.account else ""
        return f"{self.outcome}:{self.reason}{where}"

    def differs(self, new: Verdict) -> bool:
        if (self.outcome, self.reason, self.account) != (new.outcome, new.reason, new.account):
            return True
        return self.permissions is not None and self.permissions != new.permissions

    def change(self, new: Verdict) -> str:
        """`old -> new` for the summary; a permissions-only change says so."""
        text = f"{self.label()} -> {new.label()}"
        return text if self.label() != new.label() else f"{text} (permissions)"


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    source: str  # file:line, for the report
    received_at: float
    client: str
    payload: bytes | None  # None: not recorded (redacted), or the line is unreadable
    headers: dict[str, str] | None
    recorded: Verdict | None
    detail: str = ""  # the recorded decision's detail (a store failure is replayed with it)
    skip: str | None = None  # why it cannot be fed to the core
    policy: RecordedPolicy | None = None  # the recording's own; None: given by flags
    # Set when `payload` is an encrypted request as the server signed it (the box opened):
    # the public xkey that opened it.
    opened_with: str | None = None


def _headers(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("headers is not an object of strings")
    return value


def _verdict(doc: object) -> Verdict:
    if not isinstance(doc, dict):
        raise ValueError("no decision")
    reason, admit = doc.get("reason"), doc.get("admit")
    if not isinstance(reason, str) or not isinstance(admit, bool):
        raise ValueError("decision without reason/admit")
    outcome = doc.get("outcome") or ("admit" if admit else "deny")
    account = doc.get("account") or None
    permissions = doc.get("permissions") if admit else None
    if not isinstance(outcome, str) or not (account is None or isinstance(account, str)):
        raise ValueError("decision outcome/account mistyped")
    if permissions is not None and not isinstance(permissions, dict):
        raise ValueError("decision permissions mistyped")
    return Verdict(outcome, reason, account, permissions)


READ_VERSIONS = (1, recording.FORMAT_VERSION)


def _unreadable(source: str, previous: float, why: str) -> Entry:
    return Entry(source, previous, "", None, None, None,
                 skip=f"unreadable line ({why})")  # fmt: skip


def _recording_line(doc: Any, source: str, previous: float, policy: RecordedPolicy | None) -> Entry:
    try:
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        version = doc.get("v")
        if version not in READ_VERSIONS:
            return Entry(source, previous, "", None, None, None,
                         skip=f"format version {version!r} unknown")  # fmt: skip
        received = doc["received_at"]
        if not isinstance(received, int | float) or not math.isfinite(received):
            raise ValueError("received_at is not a number")
        client = doc.get("client") or ""
        if not isinstance(client, str):
            raise ValueError("client is not a string")
        verdict = _verdict(doc.get("decision"))
        detail = doc["decision"].get("detail") or ""
        headers = _headers(doc.get("headers"))
        payload: bytes | None = None
        opened_with = doc.get("opened_with")
        if not (opened_with is None or isinstance(opened_with, str)):
            raise ValueError("opened_with is not a string")
        skip: str | None = None
        if doc.get("raw") == "kept":
            # Format 1: the payload as received; 2: the request token (the box opened).
            field_name = "payload_b64" if version == 1 else "token_b64"
            payload = base64.b64decode(doc[field_name], validate=True)
        else:
            skip = f"payload not recorded ({doc.get('redaction') or 'redacted'})"
        if verdict.reason == OVERLOADED:
            skip = "shed under overload (never reached the decision core)"
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        return _unreadable(source, previous, type(exc).__name__)
    return Entry(
        source, float(received), client, payload, headers, verdict,
        str(detail), skip=skip, policy=policy if version != 1 else None,
        opened_with=opened_with if version != 1 else None,
    )  # fmt: skip


def read_recording(
    path: Path, policies: dict[bytes, RecordedPolicy] | None = None
) -> Iterator[Entry]:
    """The requests of one recording file. `policies` collects the recorded policies read so
    far, so that files recorded under the same one share it (and so one decision core)."""
    policies = {} if policies is None else policies
    policy: RecordedPolicy | None = None
    previous = 0.0
    with path.open("rb") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            source = f"{path}:{number}"
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                doc = None
            if isinstance(doc, dict) and "policy" in doc:
                if number != 1 or doc.get("v") != recording.FORMAT_VERSION or len(doc) != 2:
                    raise ReplayError(f"{source}: a policy line must be a file's first, alone")
                try:
                    read = recorded_policy.load(doc["policy"])
                except recorded_policy.PolicyDocumentError as exc:
                    raise ReplayError(f"{source}: {exc}") from None
                policy = policies.setdefault(read.key, read)
                continue
            if doc is None:
                entry = _unreadable(source, previous, "JSONDecodeError")
            else:
                entry = _recording_line(doc, source, previous, policy)
            previous = entry.received_at
            yield entry


def read(paths: Sequence[Path]) -> list[Entry]:
    """Every request under `paths` (directories or files), in arrival order. In a directory,
    recordings are its `*.jsonl` files; other files are ignored."""
    entries: list[Entry] = []
    policies: dict[bytes, RecordedPolicy] = {}
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob(f"*{recording.FILE_SUFFIX}"))
        elif path.is_file():
            files = [path]
        else:
            raise ReplayError(f"{path}: no such file or directory")
        for file in files:
            try:
                entries.extend(read_recording(file, policies))
            except OSError as exc:
                raise ReplayError(f"{file}: {exc.strerror or exc}") from None
    # Lines are written as requests finish, not as they arrive; files may come from replicas.
    entries.sort(key=lambda entry: entry.received_at)
    return entries


def read_users(lines: Iterable[bytes], source: str = "users") -> dict[str, bytes | None]:
    """JSON lines as `callout users list` / `export` print them: {"key": "U...", <record>}.
    A line `users list` shows as {"key", "invalid_record": text} stands for that stored text."""
    users: dict[str, bytes | None] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise ReplayError(f"{source}:{number}: not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("key"), str):
            raise ReplayError(f'{source}:{number}: expected an object with a "key"')
        key = doc.pop("key")
        if key in users:
            raise ReplayError(f"{source}:{number}: {key} appears twice")
        invalid = doc.get("invalid_record")
        users[key] = invalid.encode() if isinstance(invalid, str) else orjson.dumps(doc)
    return users


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


__all__ = [
    "At",
    "Entry",
    "Outcome",
    "ReplayError",
    "Replayer",
    "Summary",
    "Users",
    "Verdict",
    "answer",
    "feed",
    "read",
    "read_recording",
    "read_users",
]
