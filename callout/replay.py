"""Replay recorded requests through the decision core and compare the decisions.

Two sources are read, with the same code:

- recordings written by `callout serve --record-dir` (`callout.recording`): `*.jsonl`, one
  request per line, all replayed through ONE shared `Authorizer`, in the order they arrived,
  so what depends on earlier requests (a replayed request, a throttled key or host) is decided
  as it was;
- recorded test cases (`tests/replay/cases/*.json`, from `tests/replay/record.py`): one request
  each, with its own users map and expectation, each through a fresh `Authorizer`.

For each request the core gets the payload and headers as received and a clock: the recorded
arrival time (`at="recorded"`, what the service passed to `Authorizer.open`), or the current
time (`at="now"`: a request is valid for seconds, so an authentic recorded request then comes
out `request_expired`; that is the check that captured traffic cannot be re-used). Store
lookups are answered from a users map (a `--users` file, the bucket, or the case's own); a
store failure that was recorded (`store_unavailable`, `store_timeout`) is answered the same way
again, since it was the environment, not the policy. A request shed under overload never
reached the core and one recorded without its payload cannot be fed again: both are skipped,
never counted as changes.

A decision is the same when its outcome (admit / deny / drop), reason and account are, and,
when the recording has them, the permissions of an admit. The `detail` text is not compared.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from callout import recording
from callout.decision import (
    OVERLOADED,
    STORE_TIMEOUT,
    STORE_UNAVAILABLE,
    Authorizer,
    Decision,
    Found,
    Missing,
    Policy,
    StoreAnswer,
    TimedOut,
    Unavailable,
)

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
    kind: Literal["recording", "case"]
    received_at: float
    client: str
    payload: bytes | None  # None: not recorded (redacted), or the line is unreadable
    headers: dict[str, str] | None
    recorded: Verdict | None
    detail: str = ""  # the recorded decision's detail (a store failure is replayed with it)
    users: Users | None = None  # a case's own store
    skip: str | None = None  # why it cannot be fed to the core


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


def _recording_line(line: bytes, source: str, previous: float) -> Entry:
    try:
        doc = orjson.loads(line)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        version = doc.get("v")
        if version != recording.FORMAT_VERSION:
            return Entry(source, "recording", previous, "", None, None, None,
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
        skip: str | None = None
        if doc.get("raw") == "kept":
            payload = base64.b64decode(doc["payload_b64"], validate=True)
        else:
            skip = f"payload not recorded ({doc.get('redaction') or 'redacted'})"
        if verdict.reason == OVERLOADED:
            skip = "shed under overload (never reached the decision core)"
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError, binascii.Error) as exc:
        return Entry(source, "recording", previous, "", None, None, None,
                     skip=f"unreadable line ({type(exc).__name__})")  # fmt: skip
    return Entry(
        source, "recording", float(received), client, payload, headers, verdict,
        str(detail), skip=skip,
    )  # fmt: skip


def read_recording(path: Path) -> Iterator[Entry]:
    previous = 0.0
    with path.open("rb") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            entry = _recording_line(line, f"{path}:{number}", previous)
            previous = entry.received_at
            yield entry


def read_case(path: Path) -> Entry:
    """One recorded test case: payload_b64, headers, received_at, users, expect."""
    try:
        doc = orjson.loads(path.read_bytes())
        users_doc = doc["users"]
        if not isinstance(users_doc, dict):
            raise ValueError("users is not an object")
        users: dict[str, bytes | None] = {
            str(key): None if value is None else orjson.dumps(value)
            for key, value in users_doc.items()
        }
        nkey = _case_client(doc)
        return Entry(
            source=str(path),
            kind="case",
            received_at=float(doc["received_at"]),
            client=nkey,
            payload=base64.b64decode(doc["payload_b64"], validate=True),
            headers=_headers(doc.get("headers")),
            recorded=_verdict(doc["expect"]),
            users=users,
        )
    except (OSError, orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ReplayError(f"{path}: not a recorded case ({type(exc).__name__}: {exc})") from None


def _case_client(doc: dict[str, Any]) -> str:
    # Cases do not name the client's key; the one key of their users map is it, when there is one.
    users = doc.get("users") or {}
    return next(iter(users)) if len(users) == 1 else ""


def read(paths: Sequence[Path]) -> list[Entry]:
    """Every request under `paths` (directories or files), in arrival order. Recordings are
    `*.jsonl` files, cases `*.json` files; other files in a directory are ignored."""
    entries: list[Entry] = []
    for path in paths:
        if path.is_dir():
            files = sorted(path.glob(f"*{recording.FILE_SUFFIX}")) + sorted(path.glob("*.json"))
        elif path.is_file():
            files = [path]
        else:
            raise ReplayError(f"{path}: no such file or directory")
        for file in files:
            try:
                if file.suffix == ".json":
                    entries.append(read_case(file))
                else:
                    entries.extend(read_recording(file))
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
    value = users.get(key)
    return Missing() if value is None else Found(value)


def decide(
    authorizer: Authorizer,
    payload: bytes,
    headers: Mapping[str, str] | None,
    now: float,
    lookup: Lookup,
) -> Decision:
    """What the service does with a request (`CalloutService._handle`), the store lookup being
    `lookup`: gates 1 and 2, then gate 3 with the store's answer (none for internal keys)."""
    opened = authorizer.open(payload, headers, now)
    if isinstance(opened, Decision):
        return opened
    return authorizer.decide(opened, None if opened.internal else lookup(opened.client_key))


@dataclass(frozen=True)
class Outcome:
    entry: Entry
    new: Verdict | None = None  # None when skipped
    decision: Decision | None = None
    skipped: str | None = None

    @property
    def changed(self) -> bool:
        recorded = self.entry.recorded
        return self.new is not None and recorded is not None and recorded.differs(self.new)


@dataclass
class Replayer:
    """Feeds entries to the core. Recordings share one Authorizer (fed in arrival order);
    each case gets a fresh one."""

    policy: Policy
    users: Users | None = None  # None: each entry must carry its own (cases)
    at: At = "recorded"
    # False: `users` holds only the keys read for this replay (a bucket); a lookup of any
    # other key is an error, never "no record". True: a key not in `users` has no record.
    complete: bool = True
    clock: Callable[[], float] = time.time
    authorizer: Authorizer = field(init=False)

    def __post_init__(self) -> None:
        self.authorizer = Authorizer(self.policy)

    def run(self, entry: Entry) -> Outcome:
        if entry.skip is not None or entry.payload is None:
            return Outcome(entry, skipped=entry.skip or "no payload")
        users = self.users if self.users is not None else entry.users
        if users is None:
            raise ReplayError(f"{entry.source}: no users to answer lookups (give --users)")
        authorizer = self.authorizer if entry.kind == "recording" else Authorizer(self.policy)
        now = entry.received_at if self.at == "recorded" else self.clock()
        decision = decide(authorizer, entry.payload, entry.headers, now, self._lookup(entry, users))
        return Outcome(entry, Verdict.of(decision), decision)

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
    "decide",
    "read",
    "read_case",
    "read_recording",
    "read_users",
]
