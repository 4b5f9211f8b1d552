"""Reading recordings (`callout.recording.writer`'s files) and users files back, for the replay.

A recording is `*.jsonl`: a first line holding the policy the service decided under
(`callout.recording.policy`), then one request per line. Each line becomes an `Entry`: the
request (the token as the server signed it, or a format-1 payload as received), its headers,
its recorded arrival and decision (`Verdict`), or why it cannot be fed again (`skip`). A
line that cannot be read is an entry skipped as unreadable, never the end of the replay; a
policy line anywhere but first, or one that does not read strictly, is a `ReplayError`.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from callout.decision import OVERLOADED, Decision
from callout.recording import policy as recorded_policy
from callout.recording import writer
from callout.recording.policy import RecordedPolicy

At = Literal["recorded", "now"]
# key -> the record's bytes, or None for "no record" (a users file can say so explicitly).
Users = Mapping[str, bytes | None]


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
            writer.outcome(decision),
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


READ_VERSIONS = (1, writer.FORMAT_VERSION)


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
                if number != 1 or doc.get("v") != writer.FORMAT_VERSION or len(doc) != 2:
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
            files = sorted(path.glob(f"*{writer.FILE_SUFFIX}"))
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
