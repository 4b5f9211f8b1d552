"""One row of an import as the record it stores, and a stored record as the line `export`
writes: the same rules both ways, so an export imports back unchanged."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from callout.keys import KeyError_, KeyKind, decode_public
from callout.records import MAX_RECORD_BYTES, RecordError, UserRecord, loads, parse_record

FIELDS = ("name", "admin", "revoked", "account", "permissions")
LIST_COLUMNS = ("pub_allow", "pub_deny", "sub_allow", "sub_deny")

# Where a row came from: ("line", 3) in a file, ("rowid", 42) in SQLite, ("row", 7) in a
# table without rowids or a view (numbered in the order read).
Where = tuple[str, int]


def where(at: Where) -> str:
    return f"{at[0]} {at[1]}"


@dataclass(frozen=True, slots=True)
class Invalid:
    at: Where
    error: str
    key: str | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {self.at[0]: self.at[1]}
        if self.key is not None:
            doc["key"] = self.key
        doc["error"] = self.error
        return doc


@dataclass(slots=True)
class Item:
    """One valid row, and what planning and applying made of it."""

    key: str
    value: bytes
    at: Where
    action: str = ""
    revision: int = 0
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, self.at[0]: self.at[1], "reason": self.reason}


def user_key(value: object) -> str:
    """Like `callout users add`: case-insensitive on input, stored upper-case."""
    if value is None or value == "":
        raise RecordError("key is missing")
    if not isinstance(value, str):
        raise RecordError(f"key must be text, not {_kind(value)}")
    key = value.strip().upper()
    try:
        decode_public(key, KeyKind.USER)
    except KeyError_ as exc:
        if key.startswith("S"):
            # Never echo what may be a seed (the report goes to terminals and CI logs).
            raise RecordError(
                "that looks like a seed, not a public key (treat it as exposed)"
            ) from None
        raise RecordError(f"invalid user public key {value[:60]!r}: {exc}") from None
    return key


def record_value(doc: dict[str, Any]) -> bytes:
    """The bytes to store for a record document (without its key): validated exactly as the
    service will read it, every field explicit, `meta` kept."""
    value = orjson.dumps(_complete(parse_record(orjson.dumps(doc)), doc))
    if len(value) > MAX_RECORD_BYTES:
        raise RecordError(f"record larger than {MAX_RECORD_BYTES} bytes")
    return compact(value)


def compact(data: bytes) -> bytes:
    # orjson's output keeps its ~4 KiB working buffer; a copy is exact-size. Kept for every row,
    # that is the difference between ~60 MiB and ~450 MiB for 100,000 rows.
    return bytes(memoryview(data))


def canonical(value: bytes) -> dict[str, Any] | None:
    """A stored record as `record_value` would write it; None when it is not a valid record
    (so it differs from anything an import writes)."""
    try:
        record = parse_record(value)
    except RecordError:
        return None
    doc = orjson.loads(value)
    # The bucket key is the key: a "key" field in a record means nothing, and export drops it.
    doc.pop("key", None)
    return _complete(record, doc)


def _complete(record: UserRecord, doc: dict[str, Any]) -> dict[str, Any]:
    """The record's fields, all explicit, then the document's others (`meta`, a false
    `keep_sessions`) in their order."""
    complete = record.as_json()
    complete.update((name, value) for name, value in doc.items() if name not in complete)
    return complete


_TRUE = frozenset({"1", "true", "yes"})
_FALSE = frozenset({"", "0", "false", "no"})


def _flag(value: object, name: str) -> bool:
    if value is None:
        return False
    # bool is an int subclass: only SQLite's 0 and 1 are flags, not 2 or 1.0.
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise RecordError(f"{name} must be 0, 1, true, false, yes or no, not {value!r:.60}")


def _kind(value: object) -> str:
    return "text that is not UTF-8" if isinstance(value, NotUtf8) else type(value).__name__


def _text(value: object, name: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise RecordError(f"{name} must be text, not {_kind(value)}")


def _subject_list(value: object, name: str) -> list[str]:
    text = _text(value, name) or ""
    # Subjects cannot contain whitespace, so it separates them unambiguously; a comma can be
    # part of a subject, and here it is far more likely a mistaken separator.
    if "," in text:
        raise RecordError(f"{name}: separate subjects with spaces, not commas")
    return text.split()


def columns_record(values: dict[str, Any]) -> bytes:
    """Record bytes from column values (CSV or SQLite): the fields present among `FIELDS` and
    `LIST_COLUMNS`; NULL or empty means the field's default."""
    doc: dict[str, Any] = {}
    if "name" in values:
        doc["name"] = _text(values["name"], "name") or ""
    for flag in ("admin", "revoked"):
        if flag in values:
            doc[flag] = _flag(values[flag], flag)
    if "account" in values:
        doc["account"] = (_text(values["account"], "account") or "").strip() or None
    permissions = _text(values.get("permissions"), "permissions")
    if permissions and permissions.strip():
        doc["permissions"] = loads(permissions.encode(), "permissions")
    elif any(column in values for column in LIST_COLUMNS):
        doc["permissions"] = {
            direction: {
                kind: _subject_list(values.get(f"{direction}_{kind}"), f"{direction}_{kind}")
                for kind in ("allow", "deny")
            }
            for direction in ("pub", "sub")
        }
    return record_value(doc)


def read_row(
    at: Where, raw_key: object, build: Callable[[dict[str, Any]], bytes], doc: dict[str, Any]
) -> Item | Invalid:
    try:
        key = user_key(raw_key)
    except RecordError as exc:
        return Invalid(at, str(exc))
    try:
        return Item(key, build(doc), at)
    except RecordError as exc:
        return Invalid(at, str(exc), key)


class NotUtf8(bytes):
    """An SQLite TEXT value that is not UTF-8: its row is invalid, the read goes on."""


def export_line(key: str, value: bytes) -> tuple[bytes | None, str | None]:
    """The JSON line for a record, and why it will not import as it is (None: it will). A value
    that is not a JSON object has no line."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None, "the stored value is not JSON; not exported"
    if not isinstance(doc, dict):
        return None, "the stored value is not a JSON object; not exported"
    doc.pop("key", None)
    line = orjson.dumps({"key": key, **doc}) + b"\n"
    try:
        parse_record(value)
    except RecordError as exc:
        return line, f"exported, but import will refuse it: {exc}"
    return line, None
