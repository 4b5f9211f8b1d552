"""User records in the `users` bucket: the JSON format, parsed strictly, and subject syntax.

A record is untrusted input as far as this service is concerned: anyone with write access
to the bucket (or a bug in the control plane) can put anything there. So every field is
type-checked, every subject validated, and every size bounded; a record that fails any
check denies its user (fail closed) rather than being "mostly" applied. The schema is
closed: an unknown or misspelt key anywhere (`"Revoked"`, `"publish"`, `"Allow"`) and a key
given twice in one object are errors that name it, never ignored, because an ignored
restriction reads as "unrestricted". A control plane's own data goes in `meta`, which is
never read.

    {"name": str, "admin": bool, "revoked": bool, "keep_sessions": bool, "account": str | null,
     "permissions": {"pub": {"allow": [], "deny": []}, "sub": {"allow": [], "deny": []}},
     "meta": {...}}

Missing fields take their defaults (name "", admin false, revoked false, keep_sessions
false, account null = the service's --account, no permission lists = the account's
defaults, no meta).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_RECORD_BYTES = 64 * 1024
MAX_SUBJECTS = 1000
MAX_SUBJECT_LENGTH = 1024
MAX_NAME_LENGTH = 256
_WHITESPACE = frozenset(" \t\r\n\f\v")


class RecordError(ValueError):
    """The record (or a permission given on the command line) is invalid; says which field."""


RECORD_FIELDS = ("name", "admin", "revoked", "keep_sessions", "account", "permissions", "meta")


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return doc


def _reject_constant(name: str) -> None:
    raise ValueError(name)


def loads(data: bytes | str, what: str = "record") -> Any:
    """Strict JSON for records and permission flags: orjson's parse (valid UTF-8, no NaN, depth
    bounded), then a second look that refuses a key given twice in one object, which orjson
    (like most parsers) resolves silently to the last one. Records are parsed once per
    distinct value (the decision core caches by bytes), so the second pass is off the hot
    path."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise RecordError(f"{what} is not JSON") from None
    if isinstance(doc, (dict, list)):
        try:
            json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
        except _Duplicate as exc:
            raise RecordError(f"{what} has the key {str(exc)[:60]!r} twice in one object") from None
        except (ValueError, RecursionError):
            raise RecordError(f"{what} is not JSON") from None
    return doc


def _closed(value: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    if unknown := [key for key in value if key not in known]:
        names = ", ".join(repr(f"{where}{key}"[:80]) for key in unknown[:3])
        raise RecordError(f"unknown field {names} (allowed: {', '.join(known)})")


def subject_problem(subject: object) -> str | None:
    """Why `subject` is not a valid NATS permission subject, or None when it is.

    Stricter than the server in one way: no spaces at all, so no queue-group permissions
    (the server rejects them in publish permissions, docs/protocol.md §3 check 11, and a
    record that carries one is more likely a mistake than an intent).
    """
    if not isinstance(subject, str):
        return "not a string"
    if not subject:
        return "empty"
    if len(subject) > MAX_SUBJECT_LENGTH:
        return "too long"
    if any(ch in _WHITESPACE for ch in subject) or not subject.isprintable():
        return "contains whitespace or control characters (queue groups are not supported)"
    tokens = subject.split(".")
    for i, part in enumerate(tokens):
        if not part:
            return "empty token (leading, trailing or double '.')"
        if ">" in part and (part != ">" or i != len(tokens) - 1):
            return "'>' must be the whole last token"
        if "*" in part and part != "*":
            return "'*' must be a whole token"
    return None


def subject_covers(wide: str, narrow: str) -> bool:
    """Whether every subject the permission subject `narrow` matches is matched by `wide`
    (both valid: `subject_problem` is None)."""
    wide_tokens, narrow_tokens = wide.split("."), narrow.split(".")
    for i, part in enumerate(wide_tokens):
        if part == ">":
            return len(narrow_tokens) > i
        if i >= len(narrow_tokens) or narrow_tokens[i] == ">":
            return False
        if part not in ("*", narrow_tokens[i]):
            return False
    return len(narrow_tokens) == len(wide_tokens)


def _covered(subject: str, by: tuple[str, ...]) -> bool:
    return any(subject_covers(wide, subject) for wide in by)


@dataclass(frozen=True, slots=True)
class Rules:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def covers(self, narrow: Rules) -> bool:
        """Whether these rules allow at least everything `narrow` allows. Conservative: each
        allowed subject of `narrow` must be inside one of ours (no allow list = everything),
        and each subject we deny inside one `narrow` denied; so False may be said of rules
        that are in fact as wide, never True of narrower ones."""
        if self.allow and (
            not narrow.allow or not all(_covered(s, self.allow) for s in narrow.allow)
        ):
            return False
        return all(_covered(s, narrow.deny) for s in self.deny)

    def claims(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if self.allow:
            out["allow"] = list(self.allow)
        if self.deny:
            out["deny"] = list(self.deny)
        return out


@dataclass(frozen=True, slots=True)
class Permissions:
    pub: Rules = field(default_factory=Rules)
    sub: Rules = field(default_factory=Rules)

    def covers(self, narrow: Permissions) -> bool:
        """Whether these permissions allow at least everything `narrow` allows (`Rules.covers`)."""
        return self.pub.covers(narrow.pub) and self.sub.covers(narrow.sub)

    def claims(self) -> dict[str, Any]:
        """The user-JWT `nats` fields; empty lists are omitted (= no restriction by us)."""
        out: dict[str, Any] = {}
        if pub := self.pub.claims():
            out["pub"] = pub
        if sub := self.sub.claims():
            out["sub"] = sub
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "pub": {"allow": list(self.pub.allow), "deny": list(self.pub.deny)},
            "sub": {"allow": list(self.sub.allow), "deny": list(self.sub.deny)},
        }


UNRESTRICTED = Permissions()


@dataclass(frozen=True, slots=True)
class UserRecord:
    name: str = ""
    admin: bool = False
    revoked: bool = False
    account: str | None = None
    permissions: Permissions = UNRESTRICTED
    # With revoked: the user's live connections are left open (`users revoke --keep-sessions`).
    keep_sessions: bool = False

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name,
            "admin": self.admin,
            "revoked": self.revoked,
            "account": self.account,
            "permissions": self.permissions.as_json(),
        }
        # Written only when set: records that never used it keep their shape.
        if self.keep_sessions:
            doc["keep_sessions"] = True
        return doc


def _rules(value: object, where: str) -> Rules:
    if value is None:
        return Rules()
    if not isinstance(value, dict):
        raise RecordError(f"{where} must be an object")
    _closed(value, ("allow", "deny"), f"{where}.")
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("allow", "deny"):
        items = value.get(key, [])
        if items is None:
            items = []
        if not isinstance(items, list):
            raise RecordError(f"{where}.{key} must be a list")
        if len(items) > MAX_SUBJECTS:
            raise RecordError(f"{where}.{key} has more than {MAX_SUBJECTS} subjects")
        for i, subject in enumerate(items):
            if (problem := subject_problem(subject)) is not None:
                raise RecordError(f"{where}.{key}[{i}]: {problem}")
        lists[key] = tuple(items)
    return Rules(lists["allow"], lists["deny"])


def parse_permissions(value: object, where: str = "permissions") -> Permissions:
    if value is None:
        return UNRESTRICTED
    if not isinstance(value, dict):
        raise RecordError(f"{where} must be an object")
    _closed(value, ("pub", "sub"), f"{where}.")
    return Permissions(
        _rules(value.get("pub"), f"{where}.pub"), _rules(value.get("sub"), f"{where}.sub")
    )


def _typed(doc: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = doc.get(key, default)
    # bool is an int subclass and int is not bool: check exactly, wrong types deny.
    if value is not default and type(value) is not kind:
        raise RecordError(f"{key} must be {kind.__name__}")
    return value


def account_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if len(name) > MAX_NAME_LENGTH or not name.isprintable() or any(c in _WHITESPACE for c in name):
        return "must be printable, without whitespace, at most 256 characters"
    return None


def parse_record(data: bytes) -> UserRecord:
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record larger than {MAX_RECORD_BYTES} bytes")
    doc = loads(data)
    if not isinstance(doc, dict):
        raise RecordError("record is not a JSON object")
    _closed(doc, RECORD_FIELDS, "")
    meta = doc.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise RecordError("meta must be an object")
    name = _typed(doc, "name", str, "")
    if len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise RecordError("name must be printable and at most 256 characters")
    account = doc.get("account")
    if account is not None and (problem := account_problem(account)) is not None:
        raise RecordError(f"account {problem}")
    return UserRecord(
        name=name,
        admin=_typed(doc, "admin", bool, False),
        revoked=_typed(doc, "revoked", bool, False),
        keep_sessions=_typed(doc, "keep_sessions", bool, False),
        account=account,
        permissions=parse_permissions(doc.get("permissions")),
    )


def dump_record(record: UserRecord) -> bytes:
    return orjson.dumps(record.as_json())
